import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

PathLike = Union[str, os.PathLike[str]]

class TextClassifier(torch.nn.Module):
    labels: List[str]
    pooling: str
    pad_id: int
    peft_model: Any
    tokenizer: Any
    def encode(self, texts: Sequence[str], text_pairs: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]: ...
    def forward(self, texts: Sequence[str], text_pairs: Optional[Sequence[str]] = None) -> torch.Tensor: ...
    def predict(self, texts: Sequence[str], text_pairs: Optional[Sequence[str]] = None) -> List[str]: ...

def read_sidecar(adapter_dir: PathLike) -> Dict[str, Any]: ...
def load_classifier(
    model_dir: PathLike, adapter_dir: PathLike, max_len: int = 128
) -> Union[TextClassifier, Tuple[Any, Callable[..., torch.Tensor]]]: ...
