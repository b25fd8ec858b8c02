#!/usr/bin/env python3
"""Table of accuracy mean ± std (over seeds) per task × method × shots from runs/fewshot/<task>/<method>/<k>/<seed>/metrics.json."""
import json, statistics, sys, pathlib
from collections import defaultdict

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fewshot")
cells = defaultdict(list)
params, secs = {}, defaultdict(list)
for p in root.glob("*/*/*/*/metrics.json"):
    m = json.loads(p.read_text())
    task, method, k = p.parts[-5], p.parts[-4], p.parts[-3]
    cells[(task, method, k)].append(m["accuracy"] * 100)
    params[method] = m["trainable_params"]
    secs[method].append(m["train_seconds"])
order = ["linear-probe", "full", "lora", "uniform", "learned"]
tasks = sorted({t for t, _, _ in cells})
shots = sorted({k for _, _, k in cells}, key=lambda s: (s == "full", int(s) if s.isdigit() else 0))
methods = [m for m in order if any(mm == m for _, mm, _ in cells)]
def fmt(v):
    if not v: return "–"
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"
for task in tasks + ["average"]:
    print(f"\n**{task}** (accuracy %, mean ± std over seeds)\n")
    print("| method | " + " | ".join(f"{k}-shot" for k in shots) + " |")
    print("|---|" + "---|" * len(shots))
    for m in methods:
        row = []
        for k in shots:
            if task == "average":
                per_seed = defaultdict(list)
                for t in tasks:
                    for i, v in enumerate(cells.get((t, m, k), [])):
                        per_seed[i].append(v)
                v = [statistics.mean(x) for x in per_seed.values() if len(x) == len(tasks)]
            else:
                v = cells.get((task, m, k), [])
            row.append(fmt(v))
        print(f"| {m} | " + " | ".join(row) + " |")
print("\n| method | trainable params | mean train s |\n|---|---|---|")
for m in methods:
    print(f"| {m} | {params[m]:,} | {statistics.mean(secs[m]):.1f} |")
