"""loracomp from Python: few-shot adaptation of a frozen model by composing a bank of PEFT LoRA adapters.

The functions here run loracomp's Rust code in this process (no subprocess): each maps its keyword options onto
the same application-layer specs as the command-line flags (``--lr-head`` is ``lr_head``, and so on), releases
the GIL while loracomp computes, and returns what the command writes or prints, as Python values. The same
seeds give the same numbers as the ``loracomp`` binary.

    >>> import loracomp
    >>> m = loracomp.Model("models/all-MiniLM-L6-v2")
    >>> m.embed(["a sentence"]).shape
    (1, 384)
    >>> metrics = loracomp.adapt(model="models/all-MiniLM-L6-v2", task="tasks/mytask", shots=8,
    ...                          method="learned", bank=["bank/a", "bank/b"], out="runs/mytask")
    >>> loracomp.predict(model="models/all-MiniLM-L6-v2", adapter="runs/mytask/adapter", texts=["hello"])
    [{'label': ..., 'scores': {...}}]

Errors are :class:`LoracompError` (a ``RuntimeError``) with loracomp's message, which names the file and field;
an unknown keyword is a ``TypeError`` naming it, and a bad value a ``ValueError``. ``loracomp.hf`` loads what
loracomp writes into transformers + PEFT (``pip install 'loracomp[hf]'``).

Threads: loracomp's worker pool is built on the first call, with ``LORACOMP_THREADS`` threads (default: one per
core), and kept for the process.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _loracomp
from ._loracomp import LoracompError

__all__ = [
    "LoracompError",
    "Model",
    "adapt",
    "compose",
    "eval",
    "predict",
    "sweep",
    "train",
    "__version__",
]

__version__: str = _loracomp.__version__

PathLike = Union[str, "os.PathLike[str]"]


class Model:
    """A model directory loaded once: BERT (with ``tokenizer.json``), ViT / DINOv2, T5 or Llama.

    ``kind`` is the architecture read from ``config.json`` (``bert``, ``vit``, ``dinov2``, ``t5``, ``llama``).
    ``max_len`` truncates token sequences (special tokens included), as ``--max-len`` does.
    """

    def __init__(self, path: PathLike, max_len: int = 128) -> None:
        self._m = _loracomp.Model(os.fspath(path), max_len)

    @property
    def kind(self) -> str:
        """The architecture: ``bert``, ``vit``, ``dinov2``, ``t5`` or ``llama``."""
        return self._m.kind

    @property
    def path(self) -> str:
        """The model directory."""
        return self._m.path

    def embed(
        self,
        texts: Union[str, Sequence[str]],
        pooling: str = "mean",
        normalize: bool = False,
        batch: int = 32,
    ) -> np.ndarray:
        """Sentence embeddings of ``texts``: a float32 array ``[n, d]``, as ``loracomp embed`` prints them.

        ``pooling`` is ``mean`` (masked mean over tokens, as sentence-transformers) or ``cls``; ``normalize``
        L2-normalises each row. Only encoders have features: a T5 or Llama model raises :class:`LoracompError`.
        """
        if isinstance(texts, str):
            texts = [texts]
        raw, n, d = self._m.embed_raw(list(texts), pooling, bool(normalize), int(batch))
        return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=True).reshape(n, d)

    def __repr__(self) -> str:
        return f"loracomp.Model({self.path!r}, kind={self.kind!r})"


def _paths(v: Any) -> Any:
    if v is None or isinstance(v, (str, os.PathLike)):
        return v
    return [os.fspath(p) for p in v]


def train(*, model: PathLike, task: PathLike, out: PathLike, **options: Any) -> Dict[str, Any]:
    """Train one upstream LoRA on a task (``loracomp train``); returns the metrics written to ``out/metrics.json``.

    Options (the CLI's flags, underscores for dashes): ``seed``, ``steps``, ``batch``, ``lr``, ``lr_head``,
    ``weight_decay``, ``pooling``, ``max_len``, ``template``, ``eval_split``, ``force``,
    ``allow_base_mismatch``, ``rank`` (16), ``alpha`` (32), ``targets``, ``epochs`` (3), ``shots``.
    """
    return json.loads(_loracomp.train(model=model, task=task, out=out, **options))


def adapt(
    *,
    model: PathLike,
    task: PathLike,
    shots: Union[int, str],
    method: str,
    out: PathLike,
    bank: Sequence[PathLike] = (),
    seed: int = 0,
    **options: Any,
) -> Dict[str, Any]:
    """K-shot adaptation with one method (``loracomp adapt``); returns the metrics written to ``out/metrics.json``.

    ``shots`` is K examples per class (or ``"full"``); ``method`` one of linear-probe, full, lora, uniform,
    learned, lorahub, lorahub-compat, task-arithmetic, ties, dare, dare-ties, magnitude-prune, best-single,
    auto (the recommended composition); ``bank`` the PEFT adapter directories composed. The adapter is exported to ``out/adapter``.

    Options (the CLI's flags): ``steps``, ``batch``, ``lr``, ``lr_head``, ``weight_decay``, ``pooling``,
    ``max_len``, ``template``, ``eval_split``, ``force``, ``allow_base_mismatch``, ``rank``, ``alpha``,
    ``targets``, ``global_weights``, ``entropy_penalty``, ``export_rank``, ``select``, ``by``,
    ``lorahub_generations``, ``density``, ``drop_p``, ``auto_scales`` (a list), ``auto_top_k``, ``auto_select`` (criterion or cv), ``auto_folds``,
    ``auto_epochs``, ``auto_lora_from`` (a number of examples per class, or ``"off"``). An option of another
    method is an error naming it.
    """
    return json.loads(
        _loracomp.adapt(
            model=model, task=task, shots=shots, method=method, out=out, bank=_paths(bank), seed=seed, **options
        )
    )


def compose(
    *,
    model: PathLike,
    bank: Sequence[PathLike],
    out: PathLike,
    weights: Optional[Sequence[float]] = None,
    **options: Any,
) -> Dict[str, Any]:
    """Compose bank adapters with fixed weights (Σ w_n ΔW_n, exact) into one PEFT adapter (``loracomp compose``).

    ``weights``: one per adapter (default uniform 1/N). Options: ``export_rank``, ``task`` and ``shots``
    (together: an encoder gets a head trained on K examples per class), ``seed``, ``template``, ``force``.
    Returns ``{"out", "weights", "head", "export_relative_error"}``.
    """
    return json.loads(
        _loracomp.compose(model=model, bank=_paths(bank), out=out, weights=weights, **options)
    )


def eval(  # noqa: A001
    *, model: PathLike, task: PathLike, adapter: Optional[PathLike] = None, **options: Any
) -> Dict[str, Any]:
    """Evaluate an adapter on a task split (``loracomp eval``): ``{"accuracy", "macro_f1", "n", ...}``.

    Without ``adapter`` a generative model (T5, Llama) is evaluated zero-shot, ranking the label strings; an
    encoder needs its adapter (the head is in it).
    Options: ``split`` (test), ``max_len``, ``allow_base_mismatch`` (with an adapter), ``template`` (without one).
    """
    if adapter is not None:
        options["adapter"] = adapter
    return json.loads(_loracomp.eval(model=model, task=task, **options))


def predict(
    *,
    model: PathLike,
    adapter: PathLike,
    texts: Union[str, Sequence[str]],
    text_pairs: Optional[Sequence[str]] = None,
    max_len: int = 128,
) -> List[Dict[str, Any]]:
    """Label texts with an adapter loracomp wrote (``loracomp predict``).

    Returns one ``{"label": str, "scores": {label: probability}}`` per text, in order (probabilities sum to 1).
    """
    if isinstance(texts, str):
        texts = [texts]
    rows = json.loads(
        _loracomp.predict(model=model, adapter=adapter, texts=list(texts), text_pairs=text_pairs, max_len=max_len)
    )
    return [{"label": r["label"], "scores": r["scores"]} for r in rows]


def sweep(*, config: PathLike, out: PathLike, **options: Any) -> Dict[str, Any]:
    """Run (or resume) an experiment sweep from a TOML config (``loracomp sweep``).

    Options: ``quiet`` (default True: logs only, no progress bars), ``force``, ``tasks`` (downstream tasks to
    run). Returns ``{"cells", "out", "report"}``.
    """
    return json.loads(_loracomp.sweep(config=config, out=out, **options))
