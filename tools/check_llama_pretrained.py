#!/usr/bin/env python3
"""Check that a Llama directory written by `loracomp pretrain --arch llama` loads in Python transformers and gives
loracomp's logits and tokens.

    .venv/bin/python tools/check_llama_pretrained.py MODELDIR [--loracomp target/debug/loracomp]

Loads MODELDIR with `LlamaForCausalLM.from_pretrained` (every key must be used and none missing) and
`AutoTokenizer.from_pretrained` (the tokenizer.json loracomp trained), tokenises two texts (BOS prepended, as
loracomp does), runs them through transformers and `loracomp forward`, and prints the largest absolute logit
difference; exits 1 above 1e-4 or when the token ids differ from the `tokenizers` library's own.
"""
import argparse
import json
import subprocess
import sys
import tempfile

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--loracomp", default="target/debug/loracomp")
    a = ap.parse_args()
    model, info = LlamaForCausalLM.from_pretrained(a.model, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        print(f"loading info not clean: {bad}")
        sys.exit(1)
    model.eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    raw = Tokenizer.from_file(f"{a.model}/tokenizer.json")
    texts = ["how do i book a flight to paris", "what is the balance of my checking account"]
    ids = [tok(t).input_ids for t in texts]
    raw_ids = [raw.encode(t).ids for t in texts]
    if ids != raw_ids:
        print(f"transformers' token ids {ids} differ from tokenizer.json's {raw_ids}")
        sys.exit(1)
    if any(i[0] != tok.bos_token_id for i in ids):
        print("no BOS at the start of the sequences")
        sys.exit(1)
    n = max(len(i) for i in ids)
    input_ids = [i + [tok.eos_token_id] * (n - len(i)) for i in ids]
    mask = [[1] * len(i) + [0] * (n - len(i)) for i in ids]
    with torch.no_grad():
        want = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask)).logits.numpy()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"input_ids": input_ids, "attention_mask": mask}, f)
        path = f.name
    out = subprocess.run([a.loracomp, "forward", "--model", a.model, "--input", path], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    got_arr = np.array(got["data"], dtype=np.float32).reshape(got["shape"])
    valid = np.array(mask, dtype=bool)
    diff = float(np.abs(got_arr - want)[valid].max())
    print(f"transformers loaded {a.model} cleanly; tokens {ids}; logits {list(want.shape)}; "
          f"max |loracomp - transformers| over real tokens = {diff:.2e}")
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    main()
