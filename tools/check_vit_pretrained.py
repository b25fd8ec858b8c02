#!/usr/bin/env python3
"""Check that a ViT directory written by `loracomp pretrain` loads in Python transformers and gives loracomp's
last hidden state.

    /root/venv/bin/python tools/check_vit_pretrained.py MODELDIR [--loracomp target/debug/loracomp]

Loads MODELDIR with `ViTModel.from_pretrained(MODELDIR, add_pooling_layer=False)` (every key must be used and
none missing), runs two seeded random images through it and through `loracomp forward`, and prints the largest
absolute difference; exits 1 above 1e-4. With --write-golden FILE it also writes the pixel values and
transformers' output as JSON (the golden tests/fixtures/vit-pretrained/golden.json).
"""
import argparse
import json
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import ViTModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--loracomp", default="target/debug/loracomp")
    ap.add_argument("--write-golden")
    a = ap.parse_args()
    cfg = json.load(open(f"{a.model}/config.json"))
    n, c = cfg["image_size"], cfg["num_channels"]
    model, info = ViTModel.from_pretrained(a.model, add_pooling_layer=False, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        print(f"loading info not clean: {bad}")
        sys.exit(1)
    model.eval()
    rng = np.random.default_rng(0)
    px = rng.standard_normal((2, c, n, n)).astype(np.float32)
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(px)).last_hidden_state.numpy()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"pixel_values": px.tolist()}, f)
        path = f.name
    out = subprocess.run([a.loracomp, "forward", "--model", a.model, "--input", path], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    got_arr = np.array(got["data"], dtype=np.float32).reshape(got["shape"])
    diff = float(np.abs(got_arr - want).max())
    print(f"transformers loaded {a.model} cleanly; last_hidden_state {list(want.shape)}; max |loracomp - transformers| = {diff:.2e}")
    if a.write_golden:
        json.dump({"pixel_values": px.tolist(), "last_hidden_state": want.tolist()}, open(a.write_golden, "w"))
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    main()
