#!/usr/bin/env python3
"""Generate ViT / DINOv2 golden fixtures for loracomp from real transformers and peft.

Outputs (under --out, default tests/fixtures):
  tiny-vit/       config.json, model.safetensors (ViTModel, classic checkpoint keys), golden.json:
                    pixel_values [2,3,16,16] and last_hidden_state;
                    interp: pixel_values [1,3,24,20] and last_hidden_state with interpolate_pos_encoding=True
  tiny-vit/adapter_runtime_a   PEFT LoRA made under transformers 5 (runtime names layers.N.attention.q_proj,
                               v_proj), r=4, alpha=8
  tiny-vit/adapter_runtime_b   PEFT LoRA on k_proj, o_proj, fc1, fc2, r=2, alpha=3, use_rslora
  tiny-vit/adapter_classic_a   adapter_runtime_a with the keys and target_modules of older adapters
  tiny-vit/adapter_classic_b   (encoder.layer.N.attention.attention.query, ..., intermediate.dense, output.dense)
  tiny-vit/peft_golden.json    pixel_values and PEFT's last_hidden_state for a, b, and a+b active together
  tiny-vit/preprocessor_config.json, tiny-dinov2/preprocessor_config.json (ViTImageProcessor /
                  BitImageProcessor style) and preprocess_golden.json in each: two 0-255 images (one smaller,
                  one larger than the target) and their pixel_values, computed with torch's antialiased
                  interpolate (what transformers' torchvision backend calls), torchvision's center-crop offsets
                  (round((H - h) / 2)), rescale and normalise. (PIL / torchvision are not installed here, so
                  the processors themselves are not run.)
  tiny-dinov2/    config.json, model.safetensors (Dinov2Model, layer scale), golden.json (16x16 and 24x20),
                  adapter_runtime/ (q_proj, v_proj, fc1), peft_golden.json

The classic-keyed adapters cannot be loaded by peft under transformers 5 (their module names no longer
exist at run time); the script checks them instead by merging W + scale * B @ A into the checkpoint under the
classic key names and comparing that dense model's output with PEFT's (<= 1e-5).
Everything is float32, CPU-only and seeded.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

# PEFT stores target_modules as a set and writes it in hash order; fix the hash seed for byte-stable output.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
torch.set_default_dtype(torch.float32)

TOL = 1e-5

# runtime (transformers 5) -> classic (checkpoint) module names, per architecture
VIT_CLASSIC = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def dump_json(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def block(t: torch.Tensor) -> dict:
    t = t.detach().to(torch.float32).contiguous()
    return {"shape": list(t.shape), "data": t.reshape(-1).tolist()}


def perturb(model, seed: int, scale: float = 0.1):
    """Add seeded noise to every parameter so LayerNorms, biases and layer scales are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def pixels(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def save_model(model, out_dir: Path):
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for p in out_dir.iterdir():
        if p.name not in ("config.json", "model.safetensors"):
            p.unlink() if p.is_file() else shutil.rmtree(p)


def make_vit(out_dir: Path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    image_size=16, patch_size=4, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-12,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    model = ViTModel(cfg, add_pooling_layer=False)
    perturb(model, 1)
    model.eval()
    save_model(model, out_dir)
    model = load_vit(out_dir)
    x = pixels((2, 3, 16, 16), 2)
    xi = pixels((1, 3, 24, 20), 3)
    with torch.no_grad():
        h = model(pixel_values=x).last_hidden_state
        hi = model(pixel_values=xi, interpolate_pos_encoding=True).last_hidden_state
    dump_json({"pixel_values": x.tolist(), "last_hidden_state": block(h),
               "interp": {"pixel_values": xi.tolist(), "last_hidden_state": block(hi)}}, out_dir / "golden.json")
    print(f"[tiny-vit] seq {h.shape[1]}, interp seq {hi.shape[1]}")
    return x


def load_vit(d):
    from transformers import ViTModel

    m = ViTModel.from_pretrained(d, add_pooling_layer=False, attn_implementation="eager", dtype=torch.float32)
    return m.eval()


def load_dino(d):
    from transformers import Dinov2Model

    m = Dinov2Model.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    return m.eval()


def make_dinov2(out_dir: Path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(4)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                       image_size=16, patch_size=4, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6,
                       layerscale_value=0.5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    model = Dinov2Model(cfg)
    perturb(model, 5)
    model.eval()
    save_model(model, out_dir)
    model = load_dino(out_dir)
    x = pixels((2, 3, 16, 16), 6)
    xi = pixels((1, 3, 24, 20), 7)
    with torch.no_grad():
        h = model(pixel_values=x).last_hidden_state
        hi = model(pixel_values=xi).last_hidden_state
    dump_json({"pixel_values": x.tolist(), "last_hidden_state": block(h),
               "interp": {"pixel_values": xi.tolist(), "last_hidden_state": block(hi)}}, out_dir / "golden.json")
    print(f"[tiny-dinov2] seq {h.shape[1]}, interp seq {hi.shape[1]}")
    return x


def make_adapter(load, base_dir: Path, out_dir: Path, cfg_kwargs: dict, seed: int):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load(base_dir), LoraConfig(**cfg_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for p in out_dir.iterdir():
        if p.name not in ("adapter_config.json", "adapter_model.safetensors"):
            p.unlink() if p.is_file() else shutil.rmtree(p)
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_dir.name
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print(f"[{out_dir.name}] keys:", sorted(load_file(out_dir / "adapter_model.safetensors")))


def classic_copy(src: Path, dst: Path):
    """The same adapter keyed as an older PEFT (transformers 4) would: classic module names."""
    t = load_file(src / "adapter_model.safetensors")
    out = {}
    for k, v in t.items():
        k2 = k.replace("base_model.model.layers.", "base_model.model.encoder.layer.")
        for run, cl in VIT_CLASSIC.items():
            k2 = k2.replace(f".{run}.lora_", f".{cl}.lora_")
        out[k2] = v
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    save_file(out, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "adapter_config.json").read_text())
    names = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attention.output.dense",
             "fc1": "intermediate.dense", "fc2": "output.dense"}
    cfg["target_modules"] = sorted(names[m] for m in cfg["target_modules"])
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print(f"[{dst.name}] keys:", sorted(out))


def peft_out(load, base_dir: Path, adapters, x):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(base_dir), str(adapters[0]), adapter_name="a0")
    names = ["a0"]
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(str(a), adapter_name=f"a{i}")
        names.append(f"a{i}")
    model.base_model.set_adapter(names)
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def dense_classic(load, base_dir: Path, adapters, x):
    """W + sum over adapters of scale * B @ A, by classic key names, in the checkpoint; then the plain model."""
    sd = load_file(base_dir / "model.safetensors")
    for a in adapters:
        cfg = json.loads((a / "adapter_config.json").read_text())
        t = load_file(a / "adapter_model.safetensors")
        for k, av in t.items():
            if not k.endswith(".lora_A.weight"):
                continue
            mod = k[len("base_model.model."):-len(".lora_A.weight")]
            bv = t[k.replace("lora_A", "lora_B")]
            r = av.shape[0]
            s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
            key = mod + ".weight"
            assert key in sd, key
            sd[key] = (sd[key].double() + s * (bv.double() @ av.double())).float()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copy(base_dir / "config.json", tmp / "config.json")
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        with torch.no_grad():
            return load(tmp)(pixel_values=x).last_hidden_state


VIT_PRE = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 16, "width": 16},
           "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
DINO_PRE = {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 18},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": 16, "width": 16}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True}


def preprocess_ref(img: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Reference for loracomp's models::image on one [C, H, W] float image."""
    import torch.nn.functional as F

    x = img.unsqueeze(0)
    h, w = x.shape[-2:]
    if "shortest_edge" in cfg["size"]:
        s = cfg["size"]["shortest_edge"]
        oh, ow = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    else:
        oh, ow = cfg["size"]["height"], cfg["size"]["width"]
    mode = {2: "bilinear", 3: "bicubic"}[cfg["resample"]]
    x = F.interpolate(x, size=(oh, ow), mode=mode, antialias=True, align_corners=False)[0]
    if cfg.get("do_center_crop"):
        ch, cw = cfg["crop_size"]["height"], cfg["crop_size"]["width"]
        top, left = int(round((oh - ch) / 2.0)), int(round((ow - cw) / 2.0))
        x = x[:, top:top + ch, left:left + cw]
    x = x * cfg["rescale_factor"]
    mean = torch.tensor(cfg["image_mean"]).view(-1, 1, 1)
    std = torch.tensor(cfg["image_std"]).view(-1, 1, 1)
    return (x - mean) / std


def make_preprocess(model_dir: Path, cfg: dict, seed: int):
    (model_dir / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    g = torch.Generator().manual_seed(seed)
    cases = []
    for shape in ((3, 13, 11), (3, 37, 29)):
        img = torch.randint(0, 256, shape, generator=g).to(torch.float32)
        cases.append({"image": block(img), "pixel_values": block(preprocess_ref(img, cfg))})
    dump_json({"cases": cases}, model_dir / "preprocess_golden.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    out = Path(args.out)

    vit_dir = out / "tiny-vit"
    x = make_vit(vit_dir)
    ra, rb = vit_dir / "adapter_runtime_a", vit_dir / "adapter_runtime_b"
    make_adapter(load_vit, vit_dir, ra, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0), seed=10)
    make_adapter(load_vit, vit_dir, rb, dict(r=2, lora_alpha=3, use_rslora=True,
                                             target_modules=["k_proj", "o_proj", "fc1", "fc2"],
                                             lora_dropout=0.0), seed=11)
    ca, cb = vit_dir / "adapter_classic_a", vit_dir / "adapter_classic_b"
    classic_copy(ra, ca)
    classic_copy(rb, cb)
    gold = {"pixel_values": x.tolist()}
    for name, ads, classic in (("a", [ra], [ca]), ("b", [rb], [cb]), ("ab", [ra, rb], [ca, cb])):
        h = peft_out(load_vit, vit_dir, ads, x)
        dense = dense_classic(load_vit, vit_dir, classic, x)
        diff = (h - dense).abs().max().item()
        print(f"[tiny-vit] PEFT {name} vs dense classic merge: {diff:.3g}")
        assert diff <= TOL, diff
        gold[f"last_hidden_state_{name}"] = block(h)
    dump_json(gold, vit_dir / "peft_golden.json")

    dino_dir = out / "tiny-dinov2"
    x = make_dinov2(dino_dir)
    rd = dino_dir / "adapter_runtime"
    make_adapter(load_dino, dino_dir, rd, dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "fc1"],
                                               lora_dropout=0.0), seed=12)
    h = peft_out(load_dino, dino_dir, [rd], x)
    dump_json({"pixel_values": x.tolist(), "last_hidden_state": block(h)}, dino_dir / "peft_golden.json")

    make_preprocess(vit_dir, VIT_PRE, 20)
    make_preprocess(dino_dir, DINO_PRE, 21)

    for d in (vit_dir, dino_dir):
        total = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        print(f"{d}: total {total} B")
        assert total < 400_000, total


if __name__ == "__main__":
    main()
