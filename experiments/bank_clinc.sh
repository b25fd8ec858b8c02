#!/usr/bin/env bash
# Train the CLINC bank: one rank-16 LoRA (query, value) + head per CLINC150 domain, on all-MiniLM-L6-v2.
# Usage: experiments/bank_clinc.sh [OUTDIR]   (default runs/bank-clinc). Skips adapters already trained.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/bank-clinc}"
M=models/all-MiniLM-L6-v2
D=../shared/data/text
bash tools/fetch_minilm.sh >/dev/null
cargo build --release --quiet
for dom in auto_and_commute banking credit_cards home kitchen_and_dining meta small_talk travel utility work; do
  if [ -f "$out/clinc-$dom/metrics.json" ]; then continue; fi
  ./target/release/loracomp train --model $M --task $D/clinc-$dom --out "$out/clinc-$dom" --epochs 2 --seed 0 \
    | python3 -c "import json,sys; m=json.load(sys.stdin); print(m['task'], 'valid', round(m['valid_accuracy'],4), 'test', round(m['accuracy'],4), round(m['train_seconds'],1),'s')"
done
