#!/usr/bin/env python3
"""Generate T5 golden fixtures for loracomp from real `transformers` and `peft`.

Outputs (under --out, default tests/fixtures):
  tiny-t5/         config.json, model.safetensors, golden.json
                   feed_forward_proj="relu", tie_word_embeddings=true (original T5), seed 0
  tiny-t5-gated/   config.json, model.safetensors, golden.json
                   feed_forward_proj="gated-gelu", tie_word_embeddings=false (T5 v1.1 / Flan-T5), seed 1
  tiny-t5-gated/adapter_qv/   a real PEFT LoRA (r=2, alpha=4, target q and v, task SEQ_2_SEQ_LM) with
                   randomised factors; its logits under PeftModel are golden.json's "peft_logits"

golden.json holds the forward arguments (input_ids, attention_mask, decoder_input_ids: a fixed batch with
encoder padding), "logits" [batch, dec_seq, vocab], "labels" (with -100) and the teacher-forced "loss"
(transformers' mean cross-entropy), "buckets" (relative position buckets for relative positions -30..30, both
directions), and "rank": label token sequences and each example's summed log-probability of each.
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

VOCAB = 64
RANK_LABELS = [[5, 1], [7, 9, 1], [12, 1]]


def dump_json(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def block(t):
    t = t.detach().to(torch.float32).contiguous()
    return {"shape": list(t.shape), "data": t.reshape(-1).tolist()}


def fixed_batch():
    g = torch.Generator().manual_seed(4000)
    B, S, T = 2, 9, 6
    ids = torch.randint(2, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 3:] = 0
    ids = ids * mask  # pad id 0
    labels = torch.randint(2, VOCAB, (B, T), generator=g)
    labels[1, T - 2:] = -100
    dec = labels.clone()
    dec[dec == -100] = 0
    dec = torch.cat([torch.zeros(B, 1, dtype=torch.long), dec[:, :-1]], dim=1)  # shift right, start id 0
    return ids, mask, dec, labels


def config(ff: str, tied: bool):
    from transformers import T5Config

    return T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=6,
        d_ff=24,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj=ff,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


@torch.no_grad()
def rank_scores(model, ids, mask):
    out = []
    for lab in RANK_LABELS:
        L = len(lab)
        labels = torch.tensor([lab] * ids.shape[0])
        dec = torch.cat([torch.zeros(ids.shape[0], 1, dtype=torch.long), labels[:, :-1]], dim=1)
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        lp = torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        assert lp.shape[1] == L
        out.append(lp.sum(1))
    return torch.stack(out, dim=1)  # [batch, labels]


def make(out_dir: Path, ff: str, tied: bool, seed: int):
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config(ff, tied)).eval()
    with torch.no_grad():
        # Larger-than-init weights so that every part of the model shows in the logits; the relative position
        # bias gets a clearly non-zero table.
        g = torch.Generator().manual_seed(seed + 100)
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.3))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for p in out_dir.iterdir():
        if p.name not in ("config.json", "model.safetensors"):
            p.unlink()
        else:
            p.chmod(0o644)
    if not tied:
        # transformers 5 always ties lm_head to shared when saving; write the directory as Flan-T5's hub checkpoints
        # are (an own lm_head.weight, "tie_word_embeddings": false, no "scale_decoder_outputs").
        from safetensors.torch import load_file, save_file

        sd = load_file(out_dir / "model.safetensors")
        sd["lm_head.weight"] = model.lm_head.weight.detach().clone()
        if torch.equal(sd["lm_head.weight"], sd["shared.weight"]):
            sd["lm_head.weight"] = torch.randn(sd["shared.weight"].shape, generator=g) * 0.25
        save_file(sd, out_dir / "model.safetensors", metadata={"format": "pt"})
        (out_dir / "model.safetensors").chmod(0o644)
        c = json.loads((out_dir / "config.json").read_text())
        c.pop("scale_decoder_outputs", None)
        c["tie_word_embeddings"] = False
        (out_dir / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    # Reload from disk: the golden is what transformers computes from the saved directory.
    model = T5ForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").eval()
    from safetensors import safe_open

    with safe_open(out_dir / "model.safetensors", "pt") as f:
        keys = sorted(f.keys())
        if not tied:
            assert "lm_head.weight" in keys
            assert torch.equal(f.get_tensor("lm_head.weight"), model.lm_head.weight), "untied lm_head was lost"
            assert not torch.equal(model.lm_head.weight, model.shared.weight)
            assert not model.config.scale_decoder_outputs
        else:
            assert "lm_head.weight" not in keys and model.config.scale_decoder_outputs
    print(f"[{out_dir.name}] {len(keys)} tensors: {keys[:6]} ...")
    ids, mask, dec, labels = fixed_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-30, 31)
    buckets = {
        "relative": rel.tolist(),
        "bidirectional": T5Attention._relative_position_bucket(rel, True, 8, 12).tolist(),
        "causal": T5Attention._relative_position_bucket(rel, False, 8, 12).tolist(),
    }
    golden = {
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "decoder_input_ids": dec.tolist(),
        "labels": labels.tolist(),
        "logits": block(out.logits),
        "loss": out.loss.item(),
        "buckets": buckets,
        "rank": {"labels": RANK_LABELS, "scores": rank_scores(model, ids, mask).tolist()},
    }
    return model, golden


def make_adapter(base_dir: Path, golden: dict):
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from transformers import T5ForConditionalGeneration

    base = T5ForConditionalGeneration.from_pretrained(base_dir, attn_implementation="eager").eval()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], lora_dropout=0.0,
                     task_type=TaskType.SEQ_2_SEQ_LM)
    model = get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    out = base_dir / "adapter_qv"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    for p in out.iterdir():
        if p.name not in ("adapter_config.json", "adapter_model.safetensors"):
            p.unlink() if p.is_file() else shutil.rmtree(p)
        else:
            p.chmod(0o644)
    # Record a relative base path so loracomp's base check accepts the fixture directory.
    c = json.loads((out / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = base_dir.name
    (out / "adapter_config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = sorted(f.keys())
    print(f"[adapter_qv] {len(keys)} tensors, e.g. {keys[:3]}")
    assert all(".lora_A." in k or ".lora_B." in k for k in keys), keys
    base = T5ForConditionalGeneration.from_pretrained(base_dir, attn_implementation="eager").eval()
    pm = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor(golden["input_ids"])
    mask = torch.tensor(golden["attention_mask"])
    dec = torch.tensor(golden["decoder_input_ids"])
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    diff = (logits - torch.tensor(golden["logits"]["data"]).reshape(logits.shape)).abs().max().item()
    print(f"[adapter_qv] PEFT logits differ from the base's by {diff:.3g}")
    assert diff > 1e-2, "adapter has no visible effect"
    golden["peft_logits"] = block(logits)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    out = Path(args.out)
    _, g = make(out / "tiny-t5", "relu", True, 0)
    dump_json(g, out / "tiny-t5" / "golden.json")
    _, g = make(out / "tiny-t5-gated", "gated-gelu", False, 1)
    make_adapter(out / "tiny-t5-gated", g)
    dump_json(g, out / "tiny-t5-gated" / "golden.json")
    print("done")


if __name__ == "__main__":
    main()
