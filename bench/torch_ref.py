#!/usr/bin/env python3
"""PyTorch reference benchmark for `loracomp bench --json`.

Times one training (or inference) step of a randomly initialised HF `BertModel` of the same shapes
loracomp benchmarks, with the same head, pooling, loss and optimiser settings, and prints one JSON line
per configuration with the same fields as loracomp's `BenchResult`. See bench/README.md.

Run with the venv's python, e.g.

    /root/venv/bin/python bench/torch_ref.py --json --n 8 > bench/results/torch-f32.jsonl
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, BertModel

# (layers, heads, hidden); MLP is 4 * hidden. Mirrors src/experiments/bench.rs::workload_config.
WORKLOADS = {"minilm": (6, 12, 384), "ref4": (4, 6, 384), "tiny": (2, 4, 64)}
MODES = ["forward", "lora", "uniform", "learned", "full"]
ATTNS = ["sdpa", "eager"]
LEARNED_IMPLS = ["torch-fair", "torch-authors"]

VOCAB = 30522
TYPE_VOCAB = 2
MAX_POS = 512
BATCH = 16
SEQ = 64
CLASSES = 10
RANK = 8
ALPHA = 16.0
SCALE = ALPHA / RANK  # 2.0, as loracomp's `scale`
LR = 1e-4  # loracomp bench: AdamW { lr: 1e-4, weight_decay: 0, betas (0.9, 0.999), eps 1e-8 }
INIT = 0.05  # bank A/B entries ~ U(-0.05, 0.05), as loracomp's random_bank


# ----------------------------------------------------------------------------------------------- model


def make_bert(workload: str, attn: str) -> BertModel:
    layers, heads, d = WORKLOADS[workload]
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * d,
        hidden_act="gelu",  # exact erf GELU
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=MAX_POS,
        type_vocab_size=TYPE_VOCAB,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        attn_implementation=attn,
    )
    bert = BertModel(cfg, add_pooling_layer=False)
    assert bert.config._attn_implementation == attn, bert.config._attn_implementation
    return bert


class Classifier(nn.Module):
    """Encoder -> masked mean pooling over tokens -> linear head."""

    def __init__(self, bert: BertModel):
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, CLASSES)

    def forward(self, ids, types, mask):
        h = self.bert(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return self.head(pooled)


def random_bank(n: int, din: int, dout: int, gen: torch.Generator):
    """N frozen rank-RANK modules: A [N, r, in], B [N, out, r]."""
    a = (torch.rand(n, RANK, din, generator=gen) * 2 - 1) * INIT
    b = (torch.rand(n, dout, RANK, generator=gen) * 2 - 1) * INIT
    return a, b


class FairComposed(nn.Module):
    """Learned composition, the efficient way: each step forms
    dW = sum_n softmax(v)_n * s * B_n A_n as ONE matmul [out, N r] x [N r, in], then F.linear(x, W + dW, b)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        n, r, din = a.shape
        dout = b.shape[1]
        self.r = r
        self.weight = base.weight  # frozen
        self.bias = base.bias  # frozen
        self.register_buffer("a_cat", a.reshape(n * r, din).contiguous())  # rows n*r + j = A_n[j]
        self.register_buffer("b_cat", b.permute(1, 0, 2).reshape(dout, n * r).contiguous())  # cols n*r + j = B_n[:, j]
        self.logits = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        w = torch.softmax(self.logits, 0).repeat_interleave(self.r) * SCALE  # [N r]
        dw = (self.b_cat * w) @ self.a_cat  # [out, in]
        return F.linear(x, self.weight + dw, self.bias)


class AuthorsComposed(nn.Module):
    """Learned composition as the paper authors' code does it: every adapter applied to the input separately,
    out = base(x) + sum_n w_n * s * B_n(A_n(x)), in a Python loop over the N modules (peft-style nn.Linear pairs)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        n, r, din = a.shape
        dout = b.shape[1]
        self.base = base
        self.lora_A = nn.ModuleList()
        self.lora_B = nn.ModuleList()
        for i in range(n):
            la, lb = nn.Linear(din, r, bias=False), nn.Linear(r, dout, bias=False)
            with torch.no_grad():
                la.weight.copy_(a[i])
                lb.weight.copy_(b[i])
            la.weight.requires_grad_(False)
            lb.weight.requires_grad_(False)
            self.lora_A.append(la)
            self.lora_B.append(lb)
        self.logits = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        w = torch.softmax(self.logits, 0)
        out = self.base(x)
        for i in range(len(self.lora_A)):
            out = out + w[i] * SCALE * self.lora_B[i](self.lora_A[i](x))
        return out


def targets(bert: BertModel):
    """(self-attention module, attribute) for query and value of every layer."""
    for layer in bert.encoder.layer:
        sa = layer.attention.self
        yield sa, "query"
        yield sa, "value"


def build(workload: str, attn: str, mode: str, n: int, impl: str, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier(make_bert(workload, attn))
    model.eval()  # dropout is 0 anyway; eval for determinism
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    if mode == "forward":
        return model
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["query", "value"])
        model.bert = inject_adapter_in_model(cfg, model.bert)
        for name, p in model.bert.named_parameters():
            p.requires_grad_("lora_" in name)
    elif mode == "uniform":
        # merge the bank uniformly into W once; the timed step is then frozen encoder + head.
        with torch.no_grad():
            for sa, attr in targets(model.bert):
                lin = getattr(sa, attr)
                a, b = random_bank(n, lin.in_features, lin.out_features, gen)
                lin.weight += (SCALE / n) * torch.einsum("nor,nri->oi", b, a)
    elif mode == "learned":
        cls = {"torch-fair": FairComposed, "torch-authors": AuthorsComposed}[impl]
        for sa, attr in targets(model.bert):
            lin = getattr(sa, attr)
            a, b = random_bank(n, lin.in_features, lin.out_features, gen)
            setattr(sa, attr, cls(lin, a, b))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------- timing


def cpu_snapshot():
    """(wall s, system-wide busy CPU s from /proc/stat, this process's CPU s)."""
    busy = float("nan")
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...; idle + iowait are not busy
        busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def other_load(a, b):
    """Average number of cores busy with OTHER processes between two cpu_snapshot()s."""
    wall = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall) if wall > 0 else float("nan")


LOAD_THRESHOLD = 0.2  # cores used by other processes above which a timing counts as contaminated


def wait_idle(max_wait_s: float, threshold: float = LOAD_THRESHOLD, say=lambda *a: None):
    """Wait (up to max_wait_s) until other processes use < threshold cores over a 1 s window."""
    start = time.perf_counter()
    last_say = start
    while True:
        a = cpu_snapshot()
        time.sleep(1.0)
        load = other_load(a, cpu_snapshot())
        now = time.perf_counter()
        if not load >= threshold or now - start > max_wait_s:  # nan -> proceed
            return load
        if now - last_say >= 15:
            last_say = now
            say(f"# waited {now - start:.0f} s: other processes use {load:.2f} cores")


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; process-wide high-water mark (never goes down).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_config(workload, attn, mode, n, impl, bf16, threads, warmup, iters):
    model = build(workload, attn, mode, n, impl)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
    types = torch.zeros(BATCH, SEQ, dtype=torch.long)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)  # all sequences full length
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    amp = (
        torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )

    if mode == "forward":

        def step():
            with torch.inference_mode(), amp:
                model(ids, types, mask)

    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

        def step():
            opt.zero_grad(set_to_none=True)
            with amp:
                logits = model(ids, types, mask)
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            opt.step()

    times = []
    for it in range(warmup + iters):
        if it == warmup:
            snap0 = cpu_snapshot()
        t0 = time.perf_counter()
        step()
        dt = (time.perf_counter() - t0) * 1e3
        if it >= warmup:
            times.append(dt)
    load = other_load(snap0, cpu_snapshot())

    name = impl + ("-eager" if attn == "eager" else "") + ("-bf16" if bf16 else "")
    res = {
        "impl": name,
        "workload": workload,
        "mode": mode,
        "n_adapters": n,
        "batch": BATCH,
        "seq": SEQ,
        "threads": threads,
        "dtype": "bf16" if bf16 else "f32",
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch": torch.__version__,
        "attn": attn,
        # cores used by other processes during the timed iterations (contention check; ~0 on a quiet box)
        "other_load": round(load, 2),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad) if mode != "forward" else 0,
    }
    del model
    gc.collect()
    return res


def configs(args):
    for w in args.workloads:
        for attn in args.attn:
            for mode in args.modes:
                ns = args.n if mode in ("uniform", "learned") else [0]
                impls = LEARNED_IMPLS if mode == "learned" else ["torch"]
                impls = [i for i in impls if args.impls is None or i in args.impls]
                for n in ns:
                    for impl in impls:
                        yield w, attn, mode, n, impl


def csv(s):
    return [x for x in s.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", type=csv, default=None, help="comma list of minilm,ref4,tiny (default minilm,ref4)")
    ap.add_argument("--modes", type=csv, default=None, help="comma list of " + ",".join(MODES) + " (default all)")
    ap.add_argument("--n", type=lambda s: [int(x) for x in csv(s)], nargs="+", default=None,
                    help="bank sizes for uniform/learned, e.g. --n 8 64 or --n 1,8,64,128 (default 8 64)")
    ap.add_argument("--attn", type=csv, default=None, help="attention impls: sdpa,eager (default both)")
    ap.add_argument("--impls", type=csv, default=None,
                    help="restrict to these impls: torch,torch-fair,torch-authors (default all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=None, help="default 3")
    ap.add_argument("--iters", type=int, default=None, help="default 10")
    ap.add_argument("--bf16", action="store_true", help="run steps under torch.autocast('cpu', bfloat16)")
    ap.add_argument("--smoke", action="store_true", help="iters 2, warmup 1, tiny workload, learned N=2, sdpa")
    ap.add_argument("--isolate", action="store_true",
                    help="run every config in a fresh process (so peak_rss_mb is per config, not cumulative)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECS",
                    help="before each config wait up to SECS until other processes use < 0.2 cores")
    ap.add_argument("--retries", type=int, default=None,
                    help="rerun a config whose timing had other_load > 0.2 up to this many times "
                         "(default 2 with --wait-idle, else 0)")
    ap.add_argument("--json", action="store_true", help="print JSON lines only")
    args = ap.parse_args()

    def dflt(name, normal, smoke):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else normal)

    dflt("workloads", ["minilm", "ref4"], ["tiny"])
    dflt("modes", list(MODES), ["learned"])
    dflt("n", [[8, 64]], [[2]])
    dflt("attn", list(ATTNS), ["sdpa"])
    dflt("warmup", 3, 1)
    dflt("iters", 10, 2)
    args.n = [x for group in args.n for x in group]
    if args.retries is None:
        args.retries = 2 if args.wait_idle > 0 else 0
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    for m in args.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}")
    for a in args.attn:
        if a not in ATTNS:
            ap.error(f"unknown attention impl {a!r}")

    torch.set_num_threads(args.threads)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}, "
        f"batch {BATCH} x seq {SEQ}, warmup {args.warmup}, iters {args.iters}, {'bf16 autocast' if args.bf16 else 'f32'}")

    results = []
    for w, attn, mode, n, impl in configs(args):
        if args.isolate:
            # the child waits for idle and retries itself, right before its timing
            cmd = [sys.executable, os.path.abspath(__file__), "--json", "--workloads", w, "--attn", attn,
                   "--modes", mode, "--n", str(n if n else 1), "--impls", impl, "--threads", str(args.threads),
                   "--warmup", str(args.warmup), "--iters", str(args.iters), "--wait-idle", str(args.wait_idle),
                   "--retries", str(args.retries)] + (["--bf16"] if args.bf16 else [])
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
        else:
            for attempt in range(args.retries + 1):
                if args.wait_idle > 0:
                    wait_idle(args.wait_idle, say=say)
                res = run_config(w, attn, mode, n, impl, args.bf16, args.threads, args.warmup, args.iters)
                if not res["other_load"] > LOAD_THRESHOLD:
                    break
                say(f"# {res['impl']} {w} {mode} N={n}: other_load {res['other_load']:.2f} during timing"
                    + (", retrying" if attempt < args.retries else ", giving up (result kept)"))
        results.append(res)
        print(json.dumps(res), flush=True)

    if not args.json and results:
        say("\n| impl | workload | mode | N | dtype | median ms | min ms | peak RSS MB | other load |")
        say("|---|---|---|---:|---|---:|---:|---:|---:|")
        for r in results:
            say(f"| {r['impl']} | {r['workload']} | {r['mode']} | {r['n_adapters']} | {r['dtype']} | "
                f"{r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['peak_rss_mb']:.0f} | {r['other_load']:.2f} |")
        if any(r["other_load"] > LOAD_THRESHOLD for r in results):
            say("# WARNING: other processes were using CPU during some timings (other_load > 0.2); rerun on a quiet "
                "machine or with --wait-idle")


if __name__ == "__main__":
    main()
