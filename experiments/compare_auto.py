#!/usr/bin/env python3
"""Compare `auto` cells with the committed cells of the other methods, cell by cell (same task, shots, seed).

    python3 experiments/compare_auto.py COMMITTED_results.jsonl AUTO_results.jsonl [METHOD ...]
    python3 experiments/compare_auto.py --vs OTHER_AUTO_results.jsonl AUTO_results.jsonl

The second form compares two runs of auto (say, with and without its LoRA on top), cell by cell.

A method other than auto that AUTO_results.jsonl also holds (a re-run under a changed protocol, such as LoRA
at rank 16) is taken from there, marked "(re-run)". Prints, per shot count, a markdown table: each method's accuracy (mean over the cells both files hold, with
a 95% t-interval over seeds of the per-seed mean over tasks) and auto minus the method (paired over cells:
mean and 95% t-interval over the per-seed mean differences).
"""
import collections
import json
import math
import sys

# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def ci(xs):
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def load(path):
    out = {}
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        if r.get("kind", "main") != "main":
            continue
        out[(r["method"], r["task"], str(r["shots"]), r["seed"])] = r
    return out


def versus(other_path, auto_path):
    other, auto = load(other_path), load(auto_path)
    print("| shots | other | auto | auto − other (paired, ± 95% CI) | cells up / down | cells |")
    print("|---|---|---|---|---|---|")
    for s in sorted({k[2] for k in auto if k[0] == "auto"}, key=int):
        cells = sorted((k[1], k[3]) for k in auto if k[0] == "auto" and k[2] == s and ("auto",) + k[1:] in other)
        if not cells:
            continue
        a = {c: auto[("auto", c[0], s, c[1])]["accuracy"] * 100 for c in cells}
        o = {c: other[("auto", c[0], s, c[1])]["accuracy"] * 100 for c in cells}
        per_seed = lambda d: [sum(v) / len(v) for v in group(d).values()]
        (am, ah), (om, oh) = ci(per_seed(a)), ci(per_seed(o))
        dm, dh = ci(per_seed({c: a[c] - o[c] for c in cells}))
        up, down = sum(a[c] > o[c] for c in cells), sum(a[c] < o[c] for c in cells)
        print(f"| {s} | {om:.1f} ± {oh:.1f} | {am:.1f} ± {ah:.1f} | {dm:+.1f} ± {dh:.1f} | {up} / {down} | {len(cells)} |")


def group(d):
    by_seed = collections.defaultdict(list)
    for (_, seed), v in d.items():
        by_seed[seed].append(v)
    return by_seed


def main():
    if sys.argv[1] == "--vs":
        versus(sys.argv[2], sys.argv[3])
        return
    committed, auto = load(sys.argv[1]), load(sys.argv[2])
    methods = sys.argv[3:] or ["lorahub", "best-single", "full", "lora", "learned", "uniform", "linear-probe"]
    shots = sorted({k[2] for k in auto if k[0] == "auto"}, key=int)
    for s in shots:
        cells = sorted((k[1], k[3]) for k in auto if k[0] == "auto" and k[2] == s)
        print(f"\n### {s} shot(s): {len(cells)} cells ({len({t for t, _ in cells})} tasks x seeds "
              f"{sorted({x for _, x in cells})})\n")
        print("| method | accuracy (mean ± 95% CI over seeds) | auto − method (paired, ± 95% CI) | cells |")
        print("|---|---|---|---|")
        rows = [("auto", None)] + [(m, m) for m in methods]
        for name, m in rows:
            rerun = name != "auto" and any(k[0] == name and k[2] == s for k in auto)
            src = auto if name == "auto" or rerun else committed
            have = [(t, x) for t, x in cells if (name, t, s, x) in src]
            if not have:
                print(f"| {name} | — | — | 0 |")
                continue
            by_seed = collections.defaultdict(list)
            diff_seed = collections.defaultdict(list)
            for t, x in have:
                a = src[(name, t, s, x)]["accuracy"] * 100
                by_seed[x].append(a)
                diff_seed[x].append(auto[("auto", t, s, x)]["accuracy"] * 100 - a)
            mean, h = ci([sum(v) / len(v) for v in by_seed.values()])
            acc = f"{mean:.1f} ± {h:.1f}"
            if name == "auto":
                d = "—"
            else:
                dm, dh = ci([sum(v) / len(v) for v in diff_seed.values()])
                d = f"{dm:+.1f} ± {dh:.1f}"
            label = f"{name} (re-run)" if rerun else name
            print(f"| {label} | {acc} | {d} | {len(have)} |")
        secs = [auto[("auto", t, s, x)]["train_seconds"] for t, x in cells]
        lh = [committed[("lorahub", t, s, x)]["train_seconds"] for t, x in cells if ("lorahub", t, s, x) in committed]
        line = f"\nauto train_seconds: mean {sum(secs) / len(secs):.2f}"
        if lh:
            line += f"; lorahub (committed run): mean {sum(lh) / len(lh):.2f}"
        print(line)


if __name__ == "__main__":
    main()
