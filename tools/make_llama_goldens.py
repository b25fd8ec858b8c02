#!/usr/bin/env python3
"""Generate the tiny-Llama golden fixtures for loracomp from real `transformers` and `peft`.

Outputs (under --out, default tests/fixtures), in tiny-llama/:
  config.json, model.safetensors   random LlamaForCausalLM (seed 0): vocab 96, hidden 32, 2 layers,
                                   4 attention heads, 2 key/value heads (GQA), intermediate 40,
                                   rms_norm_eps 1e-6, rope_theta 10000, untied lm_head, no biases.
                                   Every RMSNorm weight is 1 + N(0,1)*0.2 so the norms matter.
  golden.json     a fixed 3x7 batch (row 0 full, row 1 right-padded by 2, row 2 left-padded by 3):
                  input_ids, attention_mask, labels (-100 except the last 3 real tokens of each row),
                  logits {shape, data} (eager attention), valid [batch][seq] (1 where the query
                  position sees at least one token: the left pads of row 2 see none, and their
                  outputs are an artefact of the dtype-minimum mask, so tests skip them),
                  loss (HF's causal-LM loss with the labels),
                  rank: {prompt, candidates, scores}: summed log-probability of each candidate
                  answer after the prompt (each scored alone, unpadded).
  adapter/        adapter_config.json, adapter_model.safetensors from real peft: r=4, alpha=8,
                  target q_proj, v_proj, down_proj, task_type CAUSAL_LM; lora_A and lora_B are
                  N(0,1)*0.3 (seed 10, B non-zero).
  peft_golden.json  PeftModel.from_pretrained(base, adapter) logits on the same batch.

And tiny-llama-mqa-bias-tied/ (config.json, model.safetensors, golden.json as above, no adapter): seed 5,
one layer, multi-query attention (1 key/value head), head_dim 16 (not hidden/heads), attention_bias and
mlp_bias with N(0,1)*0.1 biases, tied embeddings (no lm_head.weight saved), rope_theta 500000, eps 1e-5.

Everything is float32, CPU-only and seeded.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
torch.set_default_dtype(torch.float32)


def dump_json(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def block(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "data": [float(x) for x in t.reshape(-1).tolist()]}


def fixed_batch():
    B, S = 3, 7
    g = torch.Generator().manual_seed(3000)
    ids = torch.randint(1, 96, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 2:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    ids = ids * mask
    labels = torch.full((B, S), -100, dtype=torch.long)
    for b in range(B):
        real = mask[b].nonzero().flatten().tolist()
        for t in real[-3:]:
            labels[b, t] = ids[b, t]
    return ids, mask, labels


def load_base(out_dir: Path):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(str(out_dir), attn_implementation="eager", dtype=torch.float32)
    m.eval()
    return m


BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# one layer, multi-query attention (1 kv head), head_dim 16 != hidden/heads, biases everywhere, tied head,
# rope_theta 500000
VARIANT = dict(BASE, num_hidden_layers=1, num_key_value_heads=1, head_dim=16, attention_bias=True, mlp_bias=True,
               tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5)


def make_model(out: Path, kwargs: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out), safe_serialization=True)
    for p in out.iterdir():
        if p.name not in ("config.json", "model.safetensors"):
            p.unlink()
    print((out / "config.json").read_text())

    base = load_base(out)
    ids, mask, labels = fixed_batch()
    with torch.no_grad():
        o = base(input_ids=ids, attention_mask=mask, labels=labels)
    logits, loss = o.logits.float(), o.loss.item()
    valid = (mask.cumsum(1) > 0).long()
    # rank classification: each candidate scored alone after the prompt
    prompt = [5, 17, 33, 8]
    cands = [[40, 41], [12], [77, 3, 9]]
    scores = []
    with torch.no_grad():
        for c in cands:
            seq = torch.tensor([prompt + c])
            lp = torch.log_softmax(base(input_ids=seq).logits.double(), -1)[0]
            scores.append(sum(lp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(c)))
    dump_json(
        {
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "labels": labels.tolist(),
            "valid": valid.tolist(),
            "logits": block(logits),
            "loss": loss,
            "rank": {"prompt": prompt, "candidates": cands, "scores": scores},
        },
        out / "golden.json",
    )
    print(f"loss {loss:.6f}; rank scores {scores}")
    return ids, mask, logits, valid


def make_adapter(out: Path, ids, mask, logits, valid):
    from peft import LoraConfig, PeftModel, get_peft_model

    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    pm = get_peft_model(load_base(out), lcfg).eval()
    gl = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gl) * 0.3)
    ad = out / "adapter"
    pm.save_pretrained(str(ad), safe_serialization=True)
    for p in ad.iterdir():
        if p.name not in ("adapter_config.json", "adapter_model.safetensors"):
            p.unlink() if p.is_file() else shutil.rmtree(p)
    from safetensors import safe_open

    with safe_open(str(ad / "adapter_model.safetensors"), "pt") as f:
        print("adapter keys:", sorted(f.keys())[:4], "...")
    print((ad / "adapter_config.json").read_text())
    loaded = PeftModel.from_pretrained(load_base(out), str(ad)).eval()
    with torch.no_grad():
        pl = loaded(input_ids=ids, attention_mask=mask).logits.float()
    diff = (pl - logits).abs().max().item()
    assert diff > 1e-2, f"adapter changes logits by only {diff}"
    dump_json({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "valid": valid.tolist(),
               "logits": block(pl)}, out / "peft_golden.json")
    print(f"peft logits differ from base by {diff:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    root = Path(args.out)
    out = root / "tiny-llama"
    make_adapter(out, *make_model(out, BASE, 0))
    var = root / "tiny-llama-mqa-bias-tied"
    make_model(var, VARIANT, 5)
    with safe_keys(var / "model.safetensors") as keys:
        assert "lm_head.weight" not in keys, "a tied checkpoint stores no lm_head.weight"
    for d in (out, var):
        for p in sorted(d.rglob("*")):
            if p.is_file():
                print(f"  {p} {p.stat().st_size} bytes")


class safe_keys:
    def __init__(self, path):
        from safetensors import safe_open

        self.f = safe_open(str(path), "pt")

    def __enter__(self):
        return set(self.f.keys())

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    main()
