"""loracomp's Python API: embeddings against a numpy BERT, adapt / predict / compose / train against the CLI,
option mapping and errors."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

import loracomp
from conftest import MINILM, model_dir, task_dir, texts_of

# ------------------------------------------------------------------------------------------------------------
# a numpy BERT (sentence-transformers' masked mean pooling) from the same safetensors weights
# ------------------------------------------------------------------------------------------------------------


def read_safetensors(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        dt = {"F32": "<f4", "F16": "<f2", "I64": "<i8"}[v["dtype"]]
        out[k.removeprefix("bert.")] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=dt).astype(np.float64).reshape(
            v["shape"]
        )
    return out


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def gelu(x, act):
    if act == "gelu":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def numpy_bert_mean(model: Path, ids: list) -> np.ndarray:
    """Masked-mean-pooled last hidden states of token id lists (float64), as sentence-transformers pools."""
    cfg = json.loads((model / "config.json").read_text())
    w = read_safetensors(model / "model.safetensors")
    H, nh, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    seq = max(len(x) for x in ids)
    B = len(ids)
    tok = np.zeros((B, seq), dtype=np.int64)
    mask = np.zeros((B, seq))
    for i, x in enumerate(ids):
        tok[i, : len(x)] = x
        mask[i, : len(x)] = 1
    e = "embeddings."
    h = w[e + "word_embeddings.weight"][tok] + w[e + "position_embeddings.weight"][np.arange(seq)][None]
    h = h + w[e + "token_type_embeddings.weight"][0][None, None]
    h = layer_norm(h, w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"], eps)
    hd = H // nh
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."

        def lin(x, name):
            return x @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        def heads(x):
            return x.reshape(B, seq, nh, hd).transpose(0, 2, 1, 3)

        q, k, v = (heads(lin(h, f"attention.self.{n}")) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + (1.0 - mask)[:, None, None, :] * -1e9
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(0, 2, 1, 3).reshape(B, seq, H)
        a = layer_norm(lin(ctx, "attention.output.dense") + h, w[p + "attention.output.LayerNorm.weight"],
                       w[p + "attention.output.LayerNorm.bias"], eps)
        f = lin(gelu(lin(a, "intermediate.dense"), cfg["hidden_act"]), "output.dense")
        h = layer_norm(f + a, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    m = mask[..., None]
    return (h * m).sum(1) / m.sum(1)


def token_ids(model: Path, texts: list, max_len: int = 128) -> list:
    tokenizers = pytest.importorskip("tokenizers", reason="the numpy reference tokenises with `tokenizers`")
    tok = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return [tok.encode(t).ids for t in texts]


TEXTS = ["the apple is very red", "a sky of ice", "this question", "grass and moss and leaf and sea"]


def test_embed_matches_numpy_mean_pooling(tmp_path):
    m = model_dir(tmp_path, "tiny-bert")
    model = loracomp.Model(m)
    assert model.kind == "bert"
    e = model.embed(TEXTS)
    assert e.dtype == np.float32 and e.shape == (len(TEXTS), 32)
    ref = numpy_bert_mean(m, token_ids(m, TEXTS))
    np.testing.assert_allclose(e, ref, rtol=0, atol=2e-5)
    n = model.embed(TEXTS, normalize=True)
    np.testing.assert_allclose(n, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=0, atol=2e-5)
    cls = model.embed(TEXTS, pooling="cls")
    assert cls.shape == e.shape and not np.allclose(cls, e)
    assert model.embed([]).shape == (0, 32)


@pytest.mark.skipif(not (MINILM / "model.safetensors").is_file(), reason="bash tools/fetch_minilm.sh fetches it")
def test_embed_minilm_matches_numpy_and_cli(cli):
    model = loracomp.Model(MINILM)
    e = model.embed(TEXTS, normalize=True)
    ref = numpy_bert_mean(MINILM, token_ids(MINILM, TEXTS))
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(e, ref, rtol=0, atol=1e-4)
    out = cli("embed", "--model", MINILM, "--normalize", "--text", *TEXTS)
    rows = np.array([json.loads(x)["embedding"] for x in out.splitlines()], dtype=np.float32)
    np.testing.assert_array_equal(e, rows)


def test_embed_of_tiny_bert_equals_cli(tmp_path, cli):
    m = model_dir(tmp_path, "tiny-bert")
    e = loracomp.Model(m).embed(TEXTS, pooling="cls")
    out = cli("embed", "--model", m, "--pooling", "cls", "--text", *TEXTS)
    rows = np.array([json.loads(x)["embedding"] for x in out.splitlines()], dtype=np.float32)
    np.testing.assert_array_equal(e, rows)


# ------------------------------------------------------------------------------------------------------------
# adapt, train, predict, compose against the CLI
# ------------------------------------------------------------------------------------------------------------


def cli_adapt(cli, work, out, method, extra=()):
    args = ["adapt", "--model", work["model"], "--task", work["task"], "--shots", "4", "--method", method,
            "--seed", "3", "--out", out]
    if work["bank"] and method not in ("lora", "full", "linear-probe"):
        args += ["--bank", *work["bank"]]
    cli(*args, *extra)
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    "method,py_opts,cli_opts",
    [
        ("learned", {"steps": 12, "lr": 0.05, "entropy_penalty": 0.01}, ["--steps", "12", "--lr", "0.05",
                                                                          "--entropy-penalty", "0.01"]),
        ("lora", {"steps": 10, "rank": 2, "alpha": 4, "targets": ["query", "key"]},
         ["--steps", "10", "--rank", "2", "--alpha", "4", "--targets", "query,key"]),
        ("ties", {"density": 0.5, "steps": 5}, ["--density", "0.5", "--steps", "5"]),
    ],
)
def test_adapt_gives_the_cli_metrics(work, cli, tmp_path, method, py_opts, cli_opts):
    bank = work["bank"] if method != "lora" else []
    py = loracomp.adapt(model=work["model"], task=work["task"], shots=4, method=method, bank=bank, seed=3,
                        out=tmp_path / "py", **py_opts)
    on_disk = json.loads((tmp_path / "py" / "metrics.json").read_text())
    assert py == on_disk
    c = cli_adapt(cli, work, tmp_path / "cli", method, cli_opts)
    for key in ("accuracy", "macro_f1", "final_loss", "module_weights", "options", "n_train", "trainable_params"):
        assert py[key] == c[key], key
    assert py["accuracy"] is not None and math.isfinite(py["final_loss"])
    if method == "learned":
        assert py["module_weights"], "learned composition reports its weights"


def test_train_gives_the_cli_metrics(work, cli, tmp_path):
    up = work["dir"] / "up0"
    py = loracomp.train(model=work["model"], task=up, out=tmp_path / "py", steps=5, rank=2, seed=4,
                        targets="query,value", lr_head=0.01)
    cli("train", "--model", work["model"], "--task", up, "--out", tmp_path / "cli", "--steps", "5", "--rank", "2",
        "--seed", "4", "--targets", "query,value", "--lr-head", "0.01")
    c = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    for key in ("accuracy", "valid_accuracy", "final_loss", "rank", "targets", "steps"):
        assert py[key] == c[key], key
    assert (tmp_path / "py" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "cli" / "adapter_model.safetensors"
    ).read_bytes()


@pytest.fixture(scope="module")
def adapted(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapted") / "run"
    m = loracomp.adapt(model=work["model"], task=work["task"], shots=4, method="learned", bank=work["bank"],
                       out=out, steps=15, seed=1)
    return out / "adapter", m


def test_predict_matches_the_cli(work, adapted, cli):
    adapter, _ = adapted
    texts = texts_of(work["task"])
    preds = loracomp.predict(model=work["model"], adapter=adapter, texts=texts)
    assert len(preds) == len(texts)
    for p in preds:
        assert set(p) == {"label", "scores"} and p["label"] in ("red", "green", "blue")
        assert abs(sum(p["scores"].values()) - 1.0) < 1e-9
    lines = cli("predict", "--model", work["model"], "--adapter", adapter, "--text", *texts).splitlines()
    c = [json.loads(x) for x in lines]
    assert [p["label"] for p in preds] == [x["label"] for x in c]
    assert [p["scores"] for p in preds] == [x["scores"] for x in c]
    ev = loracomp.eval(model=work["model"], task=work["task"], adapter=adapter)
    acc = np.mean([p["label"] == json.loads(x)["label"] for p, x in
                   zip(preds, (work["task"] / "test.jsonl").read_text().splitlines())])
    assert ev["accuracy"] == pytest.approx(acc)
    # an encoder's head is in its adapter: no zero-shot evaluation; options that do not apply are errors
    with pytest.raises(loracomp.LoracompError, match="--adapter"):
        loracomp.eval(model=work["model"], task=work["task"])
    with pytest.raises(loracomp.LoracompError, match="--template"):
        loracomp.eval(model=work["model"], task=work["task"], adapter=adapter, template="{text}")


def test_compose_matches_the_cli(work, cli, tmp_path):
    py = loracomp.compose(model=work["model"], bank=work["bank"], weights=[0.7, -0.4], out=tmp_path / "py",
                          task=work["task"], shots=2, seed=5)
    assert py["head"] is True and py["weights"] == pytest.approx([0.7, -0.4])
    cli("compose", "--model", work["model"], "--bank", *work["bank"], "--weights", "0.7,-0.4", "--out",
        tmp_path / "cli", "--task", work["task"], "--shots", "2", "--seed", "5")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "py" / f).read_bytes() == (tmp_path / "cli" / f).read_bytes(), f


# ------------------------------------------------------------------------------------------------------------
# options and errors
# ------------------------------------------------------------------------------------------------------------


def test_unknown_option_is_a_type_error_naming_it(work, tmp_path):
    with pytest.raises(TypeError, match="learning_rate"):
        loracomp.adapt(model=work["model"], task=work["task"], shots=2, method="lora", out=tmp_path / "o",
                       learning_rate=0.1)
    with pytest.raises(TypeError, match="epoch"):
        loracomp.train(model=work["model"], task=work["task"], out=tmp_path / "t", epoch=2)
    with pytest.raises(TypeError, match="reporting"):
        loracomp.sweep(config=tmp_path / "c.toml", out=tmp_path / "s", reporting=True)
    assert not (tmp_path / "o").exists()


def test_bad_values_are_value_or_type_errors_naming_the_option(work, tmp_path):
    common = dict(model=work["model"], task=work["task"], out=tmp_path / "o")
    with pytest.raises(ValueError, match="steps"):
        loracomp.adapt(shots=2, method="lora", steps=0, **common)
    with pytest.raises(ValueError, match="shots"):
        loracomp.adapt(shots=0, method="lora", **common)
    with pytest.raises(ValueError, match="method"):
        loracomp.adapt(shots=2, method="lorax", **common)
    with pytest.raises(ValueError, match="pooling"):
        loracomp.adapt(shots=2, method="lora", pooling="max", **common)
    with pytest.raises(TypeError, match="lr"):
        loracomp.adapt(shots=2, method="lora", lr="fast", **common)
    # an option of another method: loracomp's own check, naming it
    with pytest.raises(loracomp.LoracompError, match="density"):
        loracomp.adapt(shots=2, method="lora", density=0.5, **common)


def test_bad_paths_raise_with_the_path(work, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(loracomp.LoracompError, match="no-such-model"):
        loracomp.Model(missing)
    with pytest.raises(RuntimeError):  # LoracompError is a RuntimeError
        loracomp.Model(missing)
    with pytest.raises(loracomp.LoracompError, match="no-such-task"):
        loracomp.adapt(model=work["model"], task=tmp_path / "no-such-task", shots=2, method="lora",
                       out=tmp_path / "o")
    with pytest.raises(loracomp.LoracompError, match="no-such-adapter"):
        loracomp.predict(model=work["model"], adapter=tmp_path / "no-such-adapter", texts=["red"])
    with pytest.raises(loracomp.LoracompError, match="no-such-bank"):
        loracomp.adapt(model=work["model"], task=work["task"], shots=2, method="uniform",
                       bank=[tmp_path / "no-such-bank"], out=tmp_path / "o")
    with pytest.raises(loracomp.LoracompError, match="no-such.toml"):
        loracomp.sweep(config=tmp_path / "no-such.toml", out=tmp_path / "s")
    # a run directory given as an adapter: the hint names its adapter/ folder
    bad = tmp_path / "run"
    (bad / "adapter").mkdir(parents=True)
    for f in ("adapter_config.json",):
        (bad / "adapter" / f).write_text("{}")
    with pytest.raises(loracomp.LoracompError, match="did you mean"):
        loracomp.predict(model=work["model"], adapter=bad, texts=["red"])


def test_existing_results_need_force(work, tmp_path):
    kw = dict(model=work["model"], task=work["task"], shots=2, method="linear-probe", out=tmp_path / "o", steps=2)
    loracomp.adapt(**kw)
    with pytest.raises(loracomp.LoracompError, match="force"):
        loracomp.adapt(**kw)
    loracomp.adapt(force=True, **kw)


def test_generative_model_has_no_embeddings(tmp_path):
    m = model_dir(tmp_path, "tiny-t5")
    model = loracomp.Model(m)
    assert model.kind == "t5"
    with pytest.raises(loracomp.LoracompError, match="generative"):
        model.embed(["red"])


def test_sweep_runs_a_small_config(work, tmp_path):
    cfg = tmp_path / "sweep.toml"
    d = work["dir"]
    cfg.write_text(
        f"""name = "python-test"
model = "{work['model']}"
data = "{d}"
upstream = ["up0", "up1"]
downstream = ["down"]
shots = [2]
seeds = 1
methods = ["linear-probe", "uniform"]
[bank]
epochs = 1
rank = 2
[adapt]
steps = 3
"""
    )
    try:
        r = loracomp.sweep(config=cfg, out=tmp_path / "sweep")
    except loracomp.LoracompError as e:  # the config format is loracomp's: report what it says
        pytest.fail(f"sweep config refused: {e}")
    assert r["cells"] >= 2 and Path(r["report"]).is_file()
