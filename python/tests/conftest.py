"""Shared fixtures: the tiny fixture models with a word-level tokenizer this suite writes, keyword tasks, a bank
trained through loracomp.train, and the CLI binary (target/debug/loracomp, or $LORACOMP_BIN) to compare with."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MINILM = ROOT / "models" / "all-MiniLM-L6-v2"

WORDS = [
    "red", "green", "blue", "apple", "grass", "sky", "cherry", "leaf", "sea", "fire", "moss", "ice", "the", "a",
    "is", "very", "and", "of", "label", "text", "question", "answer", "this", "that",
]
KEYS = [["apple", "cherry", "fire"], ["grass", "leaf", "moss"], ["sky", "sea", "ice"]]
FILLER = ["the", "a", "is", "very", "and", "of", "this", "that"]
LABELS = ["red", "green", "blue"]


def tokenizer_json(style: str) -> dict:
    """A word-level tokenizer.json: bert ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3; [CLS] A [SEP]), t5 (<pad> 0,
    </s> 1, <unk> 2; EOS appended) or llama (<unk> 0, <s> 1, </s> 2; BOS prepended)."""
    specials = {"bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "t5": ["<pad>", "</s>", "<unk>"],
                "llama": ["<unk>", "<s>", "</s>"]}[style]
    unk = {"bert": "[UNK]", "t5": "<unk>", "llama": "<unk>"}[style]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}

    def seq(x, t=0):
        return {"Sequence": {"id": x, "type_id": t}}

    def sp(x, t=0):
        return {"SpecialToken": {"id": x, "type_id": t}}

    if style == "bert":
        single = [sp("[CLS]"), seq("A"), sp("[SEP]")]
        pair = [sp("[CLS]"), seq("A"), sp("[SEP]"), seq("B", 1), sp("[SEP]", 1)]
        used = ["[CLS]", "[SEP]"]
    elif style == "t5":
        single, pair, used = [seq("A"), sp("</s>")], [seq("A"), seq("B"), sp("</s>")], ["</s>"]
    else:
        single, pair, used = [sp("<s>"), seq("A")], [sp("<s>"), seq("A"), seq("B")], ["<s>"]
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, s in enumerate(specials)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                           "special_tokens": {s: {"id": s, "ids": [vocab[s]], "tokens": [s]} for s in used}},
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk},
    }


def model_dir(tmp: Path, name: str) -> Path:
    """tests/fixtures/<name> with a tokenizer, in tmp/<name>."""
    m = tmp / name
    shutil.copytree(FIXTURES / name, m, ignore=shutil.ignore_patterns("adapter", "*golden*"))
    style = "t5" if "t5" in name else "llama" if "llama" in name else "bert"
    (m / "tokenizer.json").write_text(json.dumps(tokenizer_json(style)))
    return m


def task_dir(tmp: Path, name: str, seed: int, with_test: bool = True) -> Path:
    """A three-class task told by a keyword: red (apple, cherry, fire), green (grass, leaf, moss), blue (sky,
    sea, ice)."""
    t = tmp / name
    t.mkdir(parents=True, exist_ok=True)
    (t / "labels.txt").write_text("\n".join(LABELS) + "\n")

    def line(i, c):
        k = KEYS[c][(i + seed) % 3]
        f1 = FILLER[(i * 3 + seed) % len(FILLER)]
        f2 = FILLER[(i * 5 + c + seed) % len(FILLER)]
        return json.dumps({"text": f"{f1} {k} {f2}", "label": LABELS[c]}) + "\n"

    def split(n, off):
        return "".join(line(i + off, c) for i in range(n) for c in range(3))

    (t / "train.jsonl").write_text(split(6, 0))
    (t / "valid.jsonl").write_text(split(2, 6))
    if with_test:
        (t / "test.jsonl").write_text(split(4, 9))
    return t


def texts_of(task: Path) -> list:
    return [json.loads(x)["text"] for x in (task / "test.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="session")
def cli():
    """A function running the loracomp binary with arguments, returning its stdout (fails on a non-zero exit)."""
    b = Path(os.environ.get("LORACOMP_BIN", ROOT / "target" / "debug" / "loracomp"))
    if not b.is_file():
        msg = f"{b}: missing; build it with cargo build (or set LORACOMP_BIN)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)

    def run(*args: str) -> str:
        p = subprocess.run([str(b), *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 0, f"loracomp {' '.join(map(str, args))}\n{p.stderr}"
        return p.stdout

    return run


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    """The tiny BERT with a tokenizer, two upstream tasks, a downstream task and a bank of two LoRAs trained
    with loracomp.train."""
    import loracomp

    d = tmp_path_factory.mktemp("work")
    m = model_dir(d, "tiny-bert")
    bank = []
    for i, seed in enumerate([1, 2]):
        up = task_dir(d, f"up{i}", seed)
        out = d / f"bank{i}"
        loracomp.train(model=m, task=up, out=out, steps=8, rank=4, seed=i)
        bank.append(out)
    down = task_dir(d, "down", 0)
    return {"dir": d, "model": m, "bank": bank, "task": down}
