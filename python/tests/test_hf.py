"""loracomp.hf: loracomp's adapters in transformers + PEFT give loracomp.predict's labels (and probabilities);
a PEFT adapter written in Python is a bank member loracomp reads as PEFT computes it."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="loracomp.hf needs torch (pip install 'loracomp[hf]')")
pytest.importorskip("transformers", reason="loracomp.hf needs transformers (pip install 'loracomp[hf]')")
pytest.importorskip("peft", reason="loracomp.hf needs peft (pip install 'loracomp[hf]')")

import loracomp  # noqa: E402
from loracomp import hf  # noqa: E402
from conftest import LABELS, MINILM, model_dir, task_dir, texts_of  # noqa: E402

torch.set_num_threads(1)

EXTRA = ["the apple", "sky sky sky", "moss", "a very blue sea and a red fire", "question answer"]


def probabilities(preds):
    return np.array([[p["scores"][label] for label in LABELS] for p in preds])


def check_same(clf, work, adapter, texts):
    preds = loracomp.predict(model=work["model"], adapter=adapter, texts=texts)
    with torch.no_grad():
        logits = clf(texts)
    assert logits.shape == (len(texts), len(LABELS))
    assert clf.predict(texts) == [p["label"] for p in preds]
    np.testing.assert_allclose(torch.softmax(logits.double(), -1).numpy(), probabilities(preds), atol=1e-5)


def test_learned_composition_in_transformers_matches_predict(work, tmp_path):
    out = tmp_path / "run"
    loracomp.adapt(model=work["model"], task=work["task"], shots=4, method="learned", bank=work["bank"], out=out,
                   steps=15, seed=1)
    clf = hf.load_classifier(work["model"], out / "adapter")
    assert isinstance(clf, torch.nn.Module) and isinstance(clf, hf.TextClassifier)
    assert clf.labels == LABELS and clf.pooling == "mean"
    check_same(clf, work, out / "adapter", texts_of(work["task"]) + EXTRA)


def test_lora_with_cls_pooling_in_transformers_matches_predict(work, tmp_path):
    out = tmp_path / "run"
    loracomp.adapt(model=work["model"], task=work["task"], shots=4, method="lora", out=out, steps=10, seed=2,
                   pooling="cls", rank=2, targets=["query", "key", "value", "dense"])
    clf = hf.load_classifier(work["model"], out / "adapter")
    assert clf.pooling == "cls"
    check_same(clf, work, out / "adapter", texts_of(work["task"]) + EXTRA)


def test_trained_bank_member_in_transformers_matches_predict(work):
    clf = hf.load_classifier(work["model"], work["bank"][0])
    check_same(clf, work, work["bank"][0], texts_of(work["task"]) + EXTRA)


def test_missing_files_raise(work, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        hf.load_classifier(work["model"], tmp_path)
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="did you mean"):
        hf.load_classifier(work["model"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="loracomp.json"):
        hf.load_classifier(work["model"], tmp_path / "run" / "adapter")


def test_peft_adapter_written_in_python_is_a_bank_member(work, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    Clf, _ = hf._classifier_class()
    torch.manual_seed(0)
    bert = BertModel.from_pretrained(str(work["model"]), attn_implementation="eager", add_pooling_layer=False)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                     init_lora_weights=False)
    model = get_peft_model(Clf(bert, len(LABELS), "mean"), cfg)
    model.eval()
    with torch.no_grad():  # PEFT's own init leaves B random with init_lora_weights=False; make the head matter
        head = model.base_model.model.classifier.modules_to_save["default"]
        head.weight.copy_(torch.randn(head.weight.shape) * 2)
    d = tmp_path / "peft-adapter"
    model.save_pretrained(str(d))
    assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
    # a bank member next to loracomp's own
    m = loracomp.adapt(model=work["model"], task=work["task"], shots=2, method="learned", bank=[d, work["bank"][0]],
                       out=tmp_path / "run", steps=4)
    assert m["bank"][0] == str(d) and len(m["module_weights"]) > 0
    # with a sidecar naming its labels, loracomp predicts with it exactly as PEFT computes it
    (d / "loracomp.json").write_text(json.dumps({"labels": LABELS, "pooling": "mean", "model_kind": "bert"}))
    clf = hf.load_classifier(work["model"], d)
    texts = texts_of(work["task"]) + EXTRA
    tc = hf.TextClassifier(model, clf.tokenizer, LABELS, "mean", 0)
    with torch.no_grad():
        direct = torch.softmax(tc(texts).double(), -1).numpy()
    preds = loracomp.predict(model=work["model"], adapter=d, texts=texts)
    np.testing.assert_allclose(direct, probabilities(preds), atol=1e-5)
    check_same(clf, work, d, texts)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_generative_adapter_scores_label_strings_as_loracomp(tmp_path, name):
    m = model_dir(tmp_path, name)
    task = task_dir(tmp_path, "t", 0)
    out = tmp_path / "lora"
    loracomp.train(model=m, task=task, out=out, steps=6, rank=4, seed=0, template="{text} label")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == ("SEQ_2_SEQ_LM" if "t5" in name else "CAUSAL_LM")
    model, score = hf.load_classifier(m, out)
    assert score.labels == LABELS
    texts = texts_of(task) + EXTRA
    s = score(texts)
    assert s.shape == (len(texts), len(LABELS))
    preds = loracomp.predict(model=m, adapter=out, texts=texts)
    assert [LABELS[i] for i in s.argmax(-1).tolist()] == [p["label"] for p in preds]
    np.testing.assert_allclose(torch.softmax(s.double(), -1).numpy(), probabilities(preds), atol=1e-5)


@pytest.mark.skipif(not (MINILM / "model.safetensors").is_file(), reason="bash tools/fetch_minilm.sh fetches it")
def test_minilm_adapter_with_its_wordpiece_tokenizer_matches_predict(tmp_path):
    """The real model and tokenizer (WordPiece, lower-casing, its own fixed padding and truncation that loracomp
    turns off), with a text longer than max_len."""
    task = task_dir(tmp_path, "t", 0)
    out = tmp_path / "run"
    loracomp.adapt(model=MINILM, task=task, shots=2, method="lora", out=out, steps=3, seed=0, rank=2, max_len=32)
    clf = hf.load_classifier(MINILM, out / "adapter", max_len=32)
    texts = texts_of(task)[:4] + ["Grass, MOSS & leaves!", " ".join(["the sky is very blue"] * 20), "Ünïcödé fire"]
    preds = loracomp.predict(model=MINILM, adapter=out / "adapter", texts=texts, max_len=32)
    with torch.no_grad():
        logits = clf(texts)
    assert clf.predict(texts) == [p["label"] for p in preds]
    np.testing.assert_allclose(torch.softmax(logits.double(), -1).numpy(), probabilities(preds), atol=1e-5)
