#!/usr/bin/env python3
"""Golden rank-classification scores of LoRA adapters trained by `loracomp train` on the tiny T5 and Llama, as
Python `transformers` + `peft` compute them.

    .venv/bin/python tools/make_rank_goldens.py [--loracomp target/debug/loracomp]

Writes tests/fixtures/rank/: task/ (labels red, green, blue; keyword texts), and for tiny-t5 and tiny-llama a
directory with tokenizer.json (a word-level tokenizer: T5 style appends </s>, Llama style prepends <s>),
adapter/ (trained by `loracomp train --steps 8 --rank 4` on the task, q,v / q_proj,v_proj) and golden.json:
the test prompts, their token ids, and each label's answer score, the summed log-probability of the label's
tokens followed by EOS (T5: decoder teacher-forced from decoder_start_token_id; Llama: the tokens after the
prompt), from PeftModel.from_pretrained(base, adapter). tests/it/generative.rs compares loracomp's scores.
"""
import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM, T5ForConditionalGeneration

WORDS = ["red", "green", "blue", "apple", "grass", "sky", "cherry", "leaf", "sea", "fire", "moss", "ice", "the", "a",
         "is", "very", "and", "of", "label", "text", "question", "answer", "this", "that"]
LABELS = ["red", "green", "blue"]
KEYS = [["apple", "cherry", "fire"], ["grass", "leaf", "moss"], ["sky", "sea", "ice"]]
FILLER = ["the", "a", "is", "very", "and", "of", "this", "that"]


def tokenizer_json(t5):
    specials = ["<pad>", "</s>", "<unk>"] if t5 else ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    special = "</s>" if t5 else "<s>"
    seq = lambda x: {"Sequence": {"id": x, "type_id": 0}}  # noqa: E731
    sp = {"SpecialToken": {"id": special, "type_id": 0}}
    single, pair = ([seq("A"), sp], [seq("A"), seq("B"), sp]) if t5 else ([sp, seq("A")], [sp, seq("A"), seq("B")])
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, s in enumerate(specials)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                               "special_tokens": {special: {"id": special, "ids": [1], "tokens": [special]}}},
            "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


def write_task(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "labels.txt").write_text("\n".join(LABELS) + "\n")

    def line(i, c):
        k = KEYS[c][i % 3]
        f1, f2 = FILLER[(i * 3) % len(FILLER)], FILLER[(i * 5 + c) % len(FILLER)]
        return json.dumps({"text": f"{f1} {k} {f2}", "label": LABELS[c]})

    for split, n, off in [("train", 6, 0), ("valid", 2, 6), ("test", 3, 9)]:
        (d / f"{split}.jsonl").write_text("".join(line(i + off, c) + "\n" for i in range(n) for c in range(3)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loracomp", default="target/debug/loracomp")
    ap.add_argument("--out", default="tests/fixtures/rank")
    a = ap.parse_args()
    out = Path(a.out)
    task = out / "task"
    write_task(task)
    tests = [json.loads(l)["text"] for l in (task / "test.jsonl").read_text().splitlines()]
    for name in ["tiny-t5", "tiny-llama"]:
        t5 = "t5" in name
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(t5)))
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / name
            model_dir.mkdir()
            for f in ["config.json", "model.safetensors"]:
                shutil.copy(Path("tests/fixtures") / name / f, model_dir / f)
            shutil.copy(d / "tokenizer.json", model_dir / "tokenizer.json")
            if (d / "adapter").exists():
                shutil.rmtree(d / "adapter")
            subprocess.run([a.loracomp, "train", "--model", str(model_dir), "--task", str(task), "--out",
                            str(d / "adapter"), "--steps", "8", "--rank", "4", "--lr", "0.05", "--quiet"],
                           check=True, capture_output=True)
            cls = T5ForConditionalGeneration if t5 else LlamaForCausalLM
            base = cls.from_pretrained(model_dir)
            model = PeftModel.from_pretrained(base, str(d / "adapter")).eval()
            cfg = json.load(open(model_dir / "config.json"))
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        eos = cfg["eos_token_id"]
        answers = [tok.encode(l, add_special_tokens=False).ids + [eos] for l in LABELS]
        prompt_ids = [tok.encode(t).ids for t in tests]
        scores = []
        with torch.no_grad():
            for p in prompt_ids:
                row = []
                for ans in answers:
                    if t5:
                        start = cfg.get("decoder_start_token_id", cfg.get("pad_token_id", 0))
                        logits = model(input_ids=torch.tensor([p]), decoder_input_ids=torch.tensor([[start] + ans[:-1]])).logits[0]
                        lp = torch.log_softmax(logits.double(), -1)
                        row.append(float(sum(lp[t, tok_id] for t, tok_id in enumerate(ans))))
                    else:
                        ids = p + ans
                        logits = model(input_ids=torch.tensor([ids])).logits[0]
                        lp = torch.log_softmax(logits.double(), -1)
                        row.append(float(sum(lp[len(p) + t - 1, tok_id] for t, tok_id in enumerate(ans))))
                scores.append(row)
        json.dump({"labels": LABELS, "prompts": tests, "prompt_ids": prompt_ids, "answers": answers, "scores": scores},
                  open(d / "golden.json", "w"), indent=1)
        print(f"{name}: {len(prompt_ids)} prompts x {len(LABELS)} labels -> {d / 'golden.json'}")


if __name__ == "__main__":
    main()
