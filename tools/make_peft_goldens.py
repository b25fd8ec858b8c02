#!/usr/bin/env python3
"""Generate PEFT LoRA golden fixtures for loracomp from real `peft` and check a round trip.

Outputs (under --out, default tests/fixtures/peft):
  adapter_a/   adapter_config.json, adapter_model.safetensors
               r=4, alpha=8, target query/value, modules_to_save=["classifier"]
  adapter_b/   adapter_config.json, adapter_model.safetensors
               r=2, alpha=3, use_rslora, target query/key/value,
               rank_pattern/alpha_pattern {"encoder.layer.1.attention.self.key": 3 / 5}
  golden.json  a fixed 3x7 batch and
               logits_a / logits_b   PeftModel.from_pretrained(Clf(), adapter_X) on the batch
               compose               {"weights": [0.7, -0.4], "logits": dense W + sum_n w_n dW_n, head of a}
               peft_logits_of_loracomp_export   PEFT's logits for `loracomp compose`'s export
               (only when the loracomp binary is found; skip with --skip-loracomp)

The base model is tests/fixtures/tiny-bert (made by tools/make_goldens.py). `Clf` is the
classifier loracomp uses: BertModel -> masked mean pooling -> nn.Linear(32, 3).
Everything is float32, CPU-only and seeded.
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# PEFT stores target_modules as a set and writes it in hash order; fix the string hash seed
# so adapter_config.json is byte-identical across runs (re-exec once with PYTHONHASHSEED=0).
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
torch.set_default_dtype(torch.float32)

TINY_BERT = "tests/fixtures/tiny-bert"
DEFAULT_BIN = "target/release/loracomp"
COMPOSE_WEIGHTS = [0.7, -0.4]
TOL = 1e-5


# ----------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------
class Clf(nn.Module):
    """loracomp's classifier: BERT encoder, masked mean pooling, linear head."""

    def __init__(self, base: str = TINY_BERT, n_classes: int = 3, seed: int = 0):
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
        torch.manual_seed(seed)  # the plain head is deterministic (PEFT replaces it anyway)
        self.classifier = nn.Linear(self.bert.config.hidden_size, n_classes)
        self.eval()

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
        return self.classifier(pooled)


def fixed_batch():
    B, S = 3, 7
    g = torch.Generator().manual_seed(3000)
    ids = torch.randint(1, 99, (B, S), generator=g)  # 1..98, 0 is pad
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 2:] = 0
    mask[2, S - 4:] = 0
    ids = ids * mask
    tt = torch.zeros(B, S, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}


@torch.no_grad()
def logits_of(model, batch):
    model.eval()
    return model(**batch).detach().to(torch.float32)


def dump_json(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


# ----------------------------------------------------------------------------------------
# adapters
# ----------------------------------------------------------------------------------------
def make_adapter(out_dir: Path, cfg_kwargs: dict, lora_seed: int, head_seed: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(**cfg_kwargs)
    model = get_peft_model(Clf(), cfg)
    model.eval()
    g_lora = torch.Generator().manual_seed(lora_seed)
    g_head = torch.Generator().manual_seed(head_seed)
    n_lora = 0
    with torch.no_grad():
        # named_parameters order is deterministic (module registration order)
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g_lora) * 0.3)
                n_lora += 1
        head = model.base_model.model.classifier.modules_to_save["default"]
        head.weight.copy_(torch.randn(head.weight.shape, generator=g_head) * 0.5)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g_head) * 0.5)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for p in out_dir.iterdir():
        if p.name not in ("adapter_config.json", "adapter_model.safetensors"):
            p.unlink() if p.is_file() else shutil.rmtree(p)
    (out_dir / "adapter_model.safetensors").chmod(0o644)
    (out_dir / "adapter_config.json").chmod(0o644)
    with safe_open(out_dir / "adapter_model.safetensors", "pt") as f:
        keys = sorted(f.keys())
        shapes = {k: list(f.get_slice(k).get_shape()) for k in keys}
    print(f"[{out_dir.name}] {n_lora} lora tensors randomised; {len(keys)} saved tensors:")
    for k in keys:
        print(f"    {k} {shapes[k]}")
    print(f"[{out_dir.name}] adapter_config.json:\n" + (out_dir / "adapter_config.json").read_text())
    return keys


def pattern_lookup(pattern: dict, module: str):
    """PEFT's rule: a pattern key matches a module name ending in `.key` (or equal to it)."""
    for k, v in pattern.items():
        if re.match(rf"(.*\.)?{k}$", module):
            return v
    return None


def adapter_deltas(adapter_dir: Path):
    """{Clf state_dict weight key: scale * B @ A} and the head, read straight from the files."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(adapter_dir / "adapter_model.safetensors")
    deltas, head = {}, {}
    for key, a in t.items():
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            b = t[path + ".lora_B.weight"]
            module = path.removeprefix("base_model.model.")  # e.g. bert.encoder.layer.0...
            r_cfg = pattern_lookup(cfg.get("rank_pattern") or {}, module) or cfg["r"]
            alpha = pattern_lookup(cfg.get("alpha_pattern") or {}, module) or cfg["lora_alpha"]
            r = a.shape[0]
            assert r == r_cfg and b.shape[1] == r, (key, a.shape, b.shape, r_cfg)
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            deltas[module + ".weight"] = (scale, b.double() @ a.double())
        elif ".lora_" not in key:
            m = re.fullmatch(r"base_model\.model\.classifier\.(?:modules_to_save\.default\.)?(weight|bias)", key)
            assert m, f"unexpected key {key}"
            head[m.group(1)] = t[key]
    return deltas, head


@torch.no_grad()
def dense_compose(adapter_dirs, weights, head_from, batch):
    clf = Clf()
    sd = clf.state_dict()
    parts = [adapter_deltas(d) for d in adapter_dirs]
    new = {}
    for (deltas, _), w in zip(parts, weights):
        for k, (scale, d) in deltas.items():
            assert k in sd, k
            new[k] = new.get(k, sd[k].double()) + w * scale * d
    for k, v in new.items():
        sd[k] = v.to(torch.float32)
    head = parts[head_from][1]
    sd["classifier.weight"] = head["weight"]
    sd["classifier.bias"] = head["bias"]
    clf.load_state_dict(sd)
    return logits_of(clf, batch)


def peft_logits(adapter_dir: Path, batch):
    from peft import PeftModel

    model = PeftModel.from_pretrained(Clf(seed=123), str(adapter_dir))
    return logits_of(model, batch), model


def max_abs(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------
def run_loracomp(binary, bank, out_dir, extra):
    cmd = [binary, "compose", "--model", TINY_BERT, "--bank", *map(str, bank),
           "--weights", ",".join(str(w) for w in COMPOSE_WEIGHTS), "--head-from", "0",
           "--out", str(out_dir), "--force", *extra]
    print("$ " + " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(p.stdout.rstrip())
    print(p.stderr.rstrip())
    if p.returncode != 0:
        raise SystemExit(f"loracomp compose failed (rc={p.returncode})")
    return p.stdout + p.stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/peft", help="output dir (default: tests/fixtures/peft)")
    ap.add_argument("--loracomp", default=DEFAULT_BIN, help="loracomp binary for the round trip")
    ap.add_argument("--skip-loracomp", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dir_a, dir_b = out / "adapter_a", out / "adapter_b"

    make_adapter(dir_a, dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                             modules_to_save=["classifier"], lora_dropout=0.0,
                             init_lora_weights=True), lora_seed=10, head_seed=11)
    make_adapter(dir_b, dict(r=2, lora_alpha=3, use_rslora=True,
                             target_modules=["query", "key", "value"],
                             rank_pattern={"encoder.layer.1.attention.self.key": 3},
                             alpha_pattern={"encoder.layer.1.attention.self.key": 5},
                             modules_to_save=["classifier"], lora_dropout=0.0),
                 lora_seed=12, head_seed=13)

    batch = fixed_batch()
    logits_a, pm_a = peft_logits(dir_a, batch)
    logits_b, pm_b = peft_logits(dir_b, batch)

    # Cross-check our dense reading of the files against PEFT's own module scalings.
    for pm, d in ((pm_a, dir_a), (pm_b, dir_b)):
        deltas, _ = adapter_deltas(d)
        for name, mod in pm.base_model.model.named_modules():
            if hasattr(mod, "scaling") and isinstance(getattr(mod, "scaling"), dict) and "default" in mod.scaling:
                s_ours = deltas[name + ".weight"][0]
                assert abs(mod.scaling["default"] - s_ours) < 1e-12, (d.name, name, mod.scaling, s_ours)
                assert mod.r["default"] == mod.lora_A["default"].weight.shape[0]
                print(f"[{d.name}] {name}: r={mod.r['default']} scaling={mod.scaling['default']:.6g}")

    # Dense composition; [1,0] / [0,1] must reproduce each adapter alone.
    d_a = max_abs(dense_compose([dir_a, dir_b], [1.0, 0.0], 0, batch), logits_a)
    d_b = max_abs(dense_compose([dir_a, dir_b], [0.0, 1.0], 1, batch), logits_b)
    print(f"dense [1,0] vs PEFT a: {d_a:.3g}; dense [0,1] vs PEFT b: {d_b:.3g}")
    assert d_a <= TOL and d_b <= TOL, (d_a, d_b)
    comp = dense_compose([dir_a, dir_b], COMPOSE_WEIGHTS, 0, batch)

    golden = {k: v.tolist() for k, v in batch.items()}
    golden["logits_a"] = logits_a.tolist()
    golden["logits_b"] = logits_b.tolist()
    golden["compose"] = {"weights": COMPOSE_WEIGHTS, "head_from": 0, "logits": comp.tolist()}

    if not args.skip_loracomp:
        binary = str(Path(args.loracomp).resolve())
        with tempfile.TemporaryDirectory() as tmp:
            exp = Path(tmp) / "export"
            run_loracomp(binary, [dir_a, dir_b], exp, [])
            print("export files:", sorted(p.name for p in exp.iterdir()))
            print("export adapter_config.json:\n" + (exp / "adapter_config.json").read_text())
            with safe_open(exp / "adapter_model.safetensors", "pt") as f:
                for k in sorted(f.keys()):
                    print(f"    {k} {list(f.get_slice(k).get_shape())}")
            pl, _ = peft_logits(exp, batch)
            d = max_abs(pl, comp)
            print(f"PEFT(loracomp export) vs dense compose: max abs diff {d:.3g}")
            assert d <= TOL, d
            golden["peft_logits_of_loracomp_export"] = pl.tolist()

            exp2 = Path(tmp) / "export_r2"
            run_loracomp(binary, [dir_a, dir_b], exp2, ["--export-rank", "2"])
            pl2, _ = peft_logits(exp2, batch)
            d2 = max_abs(pl2, comp)
            rel = (pl2 - comp).norm().item() / comp.norm().item()
            print(f"[--export-rank 2] PEFT(export) vs dense compose: max abs diff {d2:.3g}, "
                  f"relative Frobenius error of logits {rel:.3g} (reported only)")

    path = out / "golden.json"
    dump_json(golden, path)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"[peft] {out}: total {total} B")
    assert total < 300_000, total


if __name__ == "__main__":
    main()
