#!/usr/bin/env bash
# Few-shot adaptation with the CLINC bank (experiments/bank_clinc.sh) on tasks outside it, every method,
# shots 1/4/16, seeds 0-4, 100 steps of batch 16. Cells already done are skipped (resumable). Then prints the table.
# Usage: experiments/fewshot_clinc_bank.sh [RUNS]   (default runs)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-runs}"
M=models/all-MiniLM-L6-v2
D=../shared/data/text
bank=$(ls -d "$runs"/bank-clinc/clinc-* | tr '\n' ' ')
TASKS="${TASKS:-hwu-general snips trec}"
SHOTS="${SHOTS:-1 4 16}"
SEEDS="${SEEDS:-0 1 2 3 4}"
METHODS="${METHODS:-linear-probe uniform learned lora full}"
for k in $SHOTS; do for seed in $SEEDS; do for task in $TASKS; do for m in $METHODS; do
  out="$runs/fewshot/$task/$m/$k/$seed"
  [ -f "$out/metrics.json" ] && continue
  mkdir -p "$out"
  ./target/release/loracomp adapt --model $M --task $D/$task --shots $k --seed $seed --method $m --steps "${STEPS:-100}" \
      --bank $bank --out "$out" --force > /dev/null 2> "$out.log" || { cat "$out.log"; exit 1; }
  rm -f "$out.log"
  python3 -c "import json; m=json.load(open('$out/metrics.json')); print('$task $m k=$k s=$seed acc', round(m['accuracy'],4), round(m['train_seconds'],1), 's')"
done; done; done; done
python3 tools/summarize.py "$runs/fewshot"
