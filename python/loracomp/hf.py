"""The adapters loracomp writes, loaded into transformers + PEFT.

``load_classifier(model_dir, adapter_dir)`` rebuilds, from the unmodified Hugging Face model directory and the
PEFT adapter directory, what loracomp computes:

* an encoder adapter (BERT; ``adapter_config.json`` with ``modules_to_save: ["classifier"]``) becomes a
  :class:`TextClassifier`, a ``torch.nn.Module`` that maps a list of texts to class logits: tokenizer
  (``tokenizer.json``, truncated to ``max_len`` as loracomp truncates), ``BertModel`` with the LoRA terms,
  the pooling from the adapter's ``loracomp.json`` (masked mean or CLS) and the ``classifier`` head. Its argmax
  labels are :func:`loracomp.predict`'s.
* a T5 or Llama adapter (no head; task type ``SEQ_2_SEQ_LM`` / ``CAUSAL_LM``) becomes ``(peft_model, score)``:
  the PEFT model and a function that ranks the label strings as docs/methods.md describes (the answer is the
  label's tokens without special tokens, then EOS; the score is the answer's summed log-probability). ``score``
  maps a list of texts to a ``[n, classes]`` tensor whose argmax is loracomp's prediction.

torch, transformers and peft are imported only here, when first used: ``pip install 'loracomp[hf]'``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["TextClassifier", "load_classifier", "read_sidecar"]

PathLike = Union[str, "os.PathLike[str]"]


def _deps():
    try:
        import torch
        import transformers
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"loracomp.hf needs torch, transformers and peft ({e}); install them with pip install 'loracomp[hf]'"
        ) from e
    return torch, transformers, peft


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            v = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(v, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return v


def read_sidecar(adapter_dir: PathLike) -> Dict[str, Any]:
    """The adapter's ``loracomp.json``: labels, pooling (encoders) or template (generative models), model kind."""
    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        hint = ""
        if (d / "adapter" / "adapter_config.json").is_file():
            hint = f" ({d} holds an adapter: did you mean {d / 'adapter'}?)"
        raise FileNotFoundError(f"{d / 'adapter_config.json'}: missing (not a PEFT adapter directory){hint}")
    meta = _read_json(d / "loracomp.json")
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ValueError(
            f"{d / 'loracomp.json'}: no label names (field 'labels'); "
            "an adapter written by loracomp train, adapt or compose --task has them"
        )
    return meta


def _tokenizer(model_dir: Path, max_len: int):
    """``tokenizer.json`` as loracomp uses it: no padding, longest-first truncation to ``max_len``."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (loracomp needs the fast tokenizer file)")
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length=max_len, strategy="longest_first", direction="right")
    return tok


def _prompt(template: Optional[str], text: str, pair: Optional[str]) -> str:
    if template is not None:
        return template.replace("{text}", text).replace("{text_pair}", pair or "")
    return text if pair is None else f"{text} {pair}"


def __getattr__(name: str) -> Any:
    # TextClassifier subclasses torch.nn.Module, so it is made on first use (torch is imported lazily).
    if name == "TextClassifier":
        return _classifier_class()[1]
    raise AttributeError(f"module 'loracomp.hf' has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _classifier_class():
    torch, _, _ = _deps()
    nn = torch.nn

    class _Clf(nn.Module):
        """loracomp's classifier, with the module names its PEFT keys use: ``bert`` and ``classifier``."""

        def __init__(self, bert, n_classes: int, pooling: str):
            super().__init__()
            self.bert = bert
            self.classifier = nn.Linear(bert.config.hidden_size, n_classes)
            self.pooling = pooling

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            if self.pooling == "cls":
                pooled = h[:, 0]
            else:
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            return self.classifier(pooled)

    class TextClassifier(nn.Module):
        """Texts → class logits, as loracomp computes them (see the module docstring).

        ``labels``: the class names (index order of the logits); ``peft_model``: the PEFT model on the
        classifier; ``pooling``: ``mean`` or ``cls``; ``predict(texts)``: the argmax label names.
        """

        def __init__(self, peft_model, tokenizer, labels: List[str], pooling: str, pad_id: int):
            super().__init__()
            self.peft_model = peft_model
            self.tokenizer = tokenizer
            self.labels = list(labels)
            self.pooling = pooling
            self.pad_id = pad_id

        def encode(self, texts: Sequence[str], text_pairs: Optional[Sequence[str]] = None) -> Dict[str, Any]:
            """Token ids, attention mask and token types, right-padded to the longest text (as loracomp does)."""
            if isinstance(texts, str):
                texts = [texts]
            if text_pairs is None:
                encs = self.tokenizer.encode_batch(list(texts))
            else:
                encs = self.tokenizer.encode_batch(list(zip(texts, text_pairs)))
            seq = max([len(e.ids) for e in encs] + [1])
            ids = torch.full((len(encs), seq), self.pad_id, dtype=torch.long)
            types = torch.zeros((len(encs), seq), dtype=torch.long)
            mask = torch.zeros((len(encs), seq), dtype=torch.long)
            for i, e in enumerate(encs):
                n = len(e.ids)
                ids[i, :n] = torch.tensor(e.ids, dtype=torch.long)
                types[i, :n] = torch.tensor(e.type_ids, dtype=torch.long)
                mask[i, :n] = 1
            return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

        def forward(self, texts: Sequence[str], text_pairs: Optional[Sequence[str]] = None):
            """Class logits ``[len(texts), len(labels)]`` (float32)."""
            batch = self.encode(texts, text_pairs)
            return self.peft_model(**batch)

        @torch.no_grad()
        def predict(self, texts: Sequence[str], text_pairs: Optional[Sequence[str]] = None) -> List[str]:
            """The label of each text (argmax of the logits)."""
            logits = self.forward(texts, text_pairs)
            return [self.labels[i] for i in logits.argmax(-1).tolist()]

    return _Clf, TextClassifier


def _special_ids(model_dir: Path, tok) -> Dict[str, Optional[int]]:
    """bos / eos / pad ids as loracomp (and transformers) resolve them: config.json, then the token files."""
    cfg = _read_json(model_dir / "config.json")
    out: Dict[str, Optional[int]] = {}
    for key in ("bos", "eos", "pad"):
        v = cfg.get(f"{key}_token_id")
        if isinstance(v, list):
            v = v[0] if v else None
        out[key] = v
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        p = model_dir / file
        if not p.is_file():
            continue
        v = _read_json(p)
        for key in ("bos", "eos", "pad"):
            if out[key] is not None:
                continue
            t = v.get(f"{key}_token")
            if isinstance(t, dict):
                t = t.get("content")
            if isinstance(t, str):
                i = tok.token_to_id(t)
                if i is None:
                    raise ValueError(f"{p}: field '{key}_token' is '{t}', which the tokenizer does not know")
                out[key] = i
    return out


def _load_generative(model_dir: Path, adapter_dir: Path, meta: Dict[str, Any], kind: str, max_len: int):
    torch, transformers, peft = _deps()
    tok = _tokenizer(model_dir, max_len)
    special = _special_ids(model_dir, tok)
    eos = special["eos"]
    if eos is None:
        raise ValueError(f"{model_dir}: no eos_token_id (config.json) or eos_token: rank classification needs it")
    labels: List[str] = meta["labels"]
    template = meta.get("template")
    answers = []
    for label in labels:
        ids = tok.encode(label, add_special_tokens=False).ids
        if not ids:
            raise ValueError(f"the tokenizer gives no tokens for the label {label!r}")
        answers.append(ids + [eos])
    if kind == "t5":
        base = transformers.T5ForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="eager"
        )
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    start = getattr(base.config, "decoder_start_token_id", None) if kind == "t5" else None
    if start is None:
        start = special["pad"] if special["pad"] is not None else 0

    @torch.no_grad()
    def score(texts: Sequence[str], text_pairs: Optional[Sequence[str]] = None):
        """Summed answer log-probability of each label for each text: a float32 tensor ``[n, classes]``."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for i, text in enumerate(texts):
            pair = None if text_pairs is None else text_pairs[i]
            prompt = tok.encode(_prompt(template, text, pair)).ids
            row = []
            for ans in answers:
                a = torch.tensor([ans], dtype=torch.long)
                if kind == "t5":
                    dec = torch.tensor([[start] + ans[:-1]], dtype=torch.long)
                    logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=dec).logits[0]
                    lp = torch.log_softmax(logits.float(), -1)
                else:
                    ids = torch.tensor([prompt + ans], dtype=torch.long)
                    logits = model(input_ids=ids).logits[0]
                    lp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(ans)].float(), -1)
                row.append(lp.gather(-1, a[0].unsqueeze(-1)).sum())
            rows.append(torch.stack(row))
        return torch.stack(rows) if rows else torch.zeros((0, len(labels)))

    score.labels = labels  # type: ignore[attr-defined]
    return model, score


def load_classifier(
    model_dir: PathLike, adapter_dir: PathLike, max_len: int = 128
) -> Union["TextClassifier", Tuple[Any, Callable[..., Any]]]:
    """Load a loracomp adapter onto its base model with transformers + PEFT.

    Encoders (BERT): returns a :class:`TextClassifier` (``torch.nn.Module``: ``clf(texts)`` → logits,
    ``clf.predict(texts)`` → label names, ``clf.labels``). T5 / Llama: returns ``(peft_model, score)`` where
    ``score(texts)`` gives each label's summed answer log-probability (``[n, classes]``; ``score.labels``).
    ``max_len`` truncates tokens as loracomp's ``max_len`` does. Errors name the file and field.
    """
    torch, transformers, peft = _deps()
    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    meta = read_sidecar(adapter_dir)
    cfg = _read_json(model_dir / "config.json")
    mt = cfg.get("model_type")
    kind = {"bert": "bert", "t5": "t5", "llama": "llama", "mistral": "llama"}.get(mt)
    if kind is None:
        raise ValueError(f"{model_dir / 'config.json'}: model_type {mt!r}: loracomp.hf loads bert, t5 and llama text models")
    if kind != "bert":
        return _load_generative(model_dir, adapter_dir, meta, kind, max_len)
    pooling = meta.get("pooling", "mean")
    if pooling not in ("mean", "cls"):
        raise ValueError(f"{adapter_dir / 'loracomp.json'}: field 'pooling' is {pooling!r} (expected mean or cls)")
    max_pos = int(cfg.get("max_position_embeddings", max_len))
    tok = _tokenizer(model_dir, min(max_len, max_pos))
    bert = transformers.BertModel.from_pretrained(
        str(model_dir), attn_implementation="eager", dtype=torch.float32, add_pooling_layer=False
    )
    Clf, TextClassifier = _classifier_class()
    clf = Clf(bert, len(meta["labels"]), pooling)
    model = peft.PeftModel.from_pretrained(clf, str(adapter_dir))
    model.eval()
    out = TextClassifier(model, tok, meta["labels"], pooling, int(cfg.get("pad_token_id") or 0))
    out.eval()
    return out
