#!/usr/bin/env python3
"""Compare `loracomp bench --json` against bench/torch_ref.py output.

    python3 bench/compare.py LORACOMP.jsonl TORCH.jsonl [TORCH2.jsonl ...] [--any-dtype]

Reads JSON lines (other lines are skipped), keys rows by (workload, mode, n_adapters, dtype) and prints a
markdown table with one row per key and torch impl: loracomp median ms, torch median ms and the ratio
loracomp / torch (< 1 means loracomp is faster). Rows with impl "loracomp" in any file are loracomp's; every
other impl is a torch column. If a key+impl occurs more than once, the last line wins.
--any-dtype ignores dtype when matching (e.g. loracomp f32 against torch bf16 autocast).
Only the standard library is used.
"""

import argparse
import json
import math
import sys

MODE_ORDER = {"forward": 0, "lora": 1, "uniform": 2, "learned": 3, "full": 4}


def read_jsonl(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and "impl" in r and "median_ms" in r:
                rows.append(r)
    return rows


def key(r, any_dtype):
    return (r["workload"], r["mode"], int(r.get("n_adapters", 0)), "*" if any_dtype else r.get("dtype", "f32"))


def sort_key(k):
    w, m, n, d = k
    return (w, MODE_ORDER.get(m, 99), m, n, d)


def fmt(x):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def main():
    ap = argparse.ArgumentParser(description="loracomp / torch median-time ratios as a markdown table")
    ap.add_argument("loracomp", help="JSON lines from `loracomp bench --json`")
    ap.add_argument("torch", nargs="+", help="JSON lines from bench/torch_ref.py")
    ap.add_argument("--any-dtype", action="store_true", help="match rows regardless of dtype")
    args = ap.parse_args()

    lc, th = {}, {}
    for path in [args.loracomp] + args.torch:
        for r in read_jsonl(path):
            k = key(r, args.any_dtype)
            if r["impl"] == "loracomp":
                lc[k] = r
            else:
                th[(k, r["impl"])] = r
    if not lc:
        sys.exit(f"no loracomp rows (impl \"loracomp\") in {args.loracomp}")
    if not th:
        sys.exit("no torch rows in " + ", ".join(args.torch))

    threads = sorted({r.get("threads") for r in list(lc.values()) + list(th.values())}, key=str)
    if len(threads) > 1:
        print(f"> note: rows were measured with different thread counts: {threads}\n")

    print("| workload | mode | N | dtype | torch impl | loracomp ms | torch ms | loracomp/torch |")
    print("|---|---|---:|---|---|---:|---:|---:|")
    unmatched = []
    for (k, impl) in sorted(th, key=lambda ki: (sort_key(ki[0]), ki[1])):
        t = th[(k, impl)]
        l = lc.get(k)
        if l is None:
            unmatched.append((k, impl))
            continue
        ratio = l["median_ms"] / t["median_ms"] if t["median_ms"] > 0 else float("nan")
        dtype = k[3] if k[3] != "*" else f"{l.get('dtype', '?')} vs {t.get('dtype', '?')}"
        print(f"| {k[0]} | {k[1]} | {k[2]} | {dtype} | {impl} | {fmt(l['median_ms'])} | {fmt(t['median_ms'])} | "
              f"{ratio:.2f} |")
    missing = sorted(k for k in lc if not any(k == tk for (tk, _) in th))
    if unmatched:
        print(f"\n{len(unmatched)} torch row(s) without a loracomp row: "
              + ", ".join(f"{k[0]}/{k[1]}/N={k[2]}/{k[3]} ({i})" for k, i in unmatched))
    if missing:
        print(f"\n{len(missing)} loracomp row(s) without a torch row: "
              + ", ".join(f"{k[0]}/{k[1]}/N={k[2]}/{k[3]}" for k in missing))


if __name__ == "__main__":
    main()
