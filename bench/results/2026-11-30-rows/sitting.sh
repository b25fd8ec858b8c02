#!/bin/bash
# One sitting: loracomp and PyTorch (transformers and lean), f32 and bf16 autocast, learned N = 8, 2 threads.
set -e
cd "$(dirname "$0")/../../.."
D=bench/results/2026-11-30-rows
mkdir -p $D
PY=${PY:-.venv/bin/python}
W=ref4,t5small,llama4
uptime > $D/uptime.txt
RAYON_NUM_THREADS=2 target/release/loracomp bench --json --workloads $W --modes learned --n 8 > $D/loracomp-f32.jsonl
uptime >> $D/uptime.txt
RAYON_NUM_THREADS=2 target/release/loracomp bench --json --compute bf16 --workloads $W --modes learned --n 8 > $D/loracomp-bf16.jsonl
uptime >> $D/uptime.txt
$PY bench/torch_ref.py --json --workloads $W --modes learned --n 8 --attn sdpa --impls torch-fair --isolate > $D/torch-f32.jsonl
uptime >> $D/uptime.txt
$PY bench/torch_ref.py --json --lean --workloads $W --modes learned --n 8 --impls torch-fair --isolate > $D/lean-f32.jsonl
uptime >> $D/uptime.txt
$PY bench/torch_ref.py --json --bf16 --workloads $W --modes learned --n 8 --attn sdpa --impls torch-fair --isolate > $D/torch-bf16.jsonl
uptime >> $D/uptime.txt
$PY bench/torch_ref.py --json --bf16 --lean --workloads $W --modes learned --n 8 --impls torch-fair --isolate > $D/lean-bf16.jsonl
uptime >> $D/uptime.txt
echo done
