#!/usr/bin/env bash
# The vision suites end to end: task dirs from ../shared/data/vision, a small ViT pre-trained from scratch on
# five CIFAR-10 classes (phase 1), then the label-shift and domain-shift sweeps (phases 2 and 3).
# Usage: experiments/vision.sh [BIN]   (default: build and use target/release/loracomp).
# Reports land in runs/vision-label-shift and runs/vision-domain-shift; the committed copies are in
# experiments/reports/. Skips the task dirs and the model when already there (sweeps resume by themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-}"
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=./target/release/loracomp
fi
[ -f tasks/vision/mnist/train.bin ] || "$bin" vision-tasks --data ../shared/data/vision --out tasks/vision --seed 0 >/dev/null
[ -f models/vit-cifar5/model.safetensors ] || "$bin" pretrain --arch vit --task tasks/vision/cifar10-pretrain \
  --out models/vit-cifar5 --hidden 128 --layers 4 --heads 4 --mlp 256 --patch 4 --image-size 32 \
  --epochs 3 --batch 32 --lr 1e-3 --weight-decay 0.05 --seed 0
for s in label domain; do
  "$bin" sweep --config experiments/vision_${s}_shift.toml --out runs/vision-${s}-shift
done
