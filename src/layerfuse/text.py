"""Instruction embeddings for text-conditioned fusers: a Hugging Face text encoder + mean pooling.

[`InstructionGatedFuser`][layerfuse.InstructionGatedFuser] takes sentence embeddings, not text: the encoder stays
outside the fuser (and outside the saved model), as the authors' pipeline intends. IGVA was trained
with ``sentence-transformers/all-mpnet-base-v2``: masked mean pooling of the last hidden state, then
L2 normalisation, which [`embed_texts`][layerfuse.text.embed_texts] reproduces with a plain ``transformers`` model:

```python
embedder = TextEmbedder("sentence-transformers/all-mpnet-base-v2", max_length=384)
text = embedder(["What is the man holding?", "Describe the image."])     # (2, 768), unit norm
```

With the ``sentence-transformers`` package installed, the same embeddings come from
``SentenceTransformer("all-mpnet-base-v2").encode(texts, convert_to_tensor=True,
normalize_embeddings=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_tensor
from ._optional import require
from .ops.layer_mean import accumulation_dtype

__all__ = ["TextEmbedder", "embed_texts", "mean_pool"]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states where ``attention_mask`` is 1, in float32 (float64 stays float64).

    Args:
        hidden: (B, L, E) token states.
        attention_mask: (B, L) of 0/1 (padding = 0); every row needs at least one 1.

    Returns:
        (B, E).
    """
    where = "mean_pool"
    check_tensor(where, "hidden", hidden, shape="(B, L, E)", ndim=3)
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"{where}: attention_mask expected a torch.Tensor (B, L), got {type(attention_mask).__name__}")
    if hidden.ndim != 3 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"{where}: expected hidden (B, L, E) and attention_mask (B, L), got {tuple(hidden.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    acc = accumulation_dtype(hidden.dtype)
    mask = attention_mask.to(acc).unsqueeze(-1)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError(f"{where}: attention_mask has a row without any token; every text needs one")
    return (hidden.to(acc) * mask).sum(dim=1) / counts


def _check_texts(where: str, texts: object) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{where}: texts expected a sequence of str, got {texts!r:.80}")
    if len(texts) == 0:
        raise ValueError(f"{where}: texts expected at least one text, got an empty sequence")
    return list(texts)


@torch.no_grad()
def embed_texts(
    texts: Sequence[str],
    model: nn.Module,
    tokenizer: Any,
    *,
    normalize: bool = True,
    max_length: int | None = None,
    batch_size: int = 64,
) -> Tensor:
    """Sentence embeddings: masked mean of ``model``'s last hidden state, L2-normalised.

    Args:
        texts: the instructions, one per sample.
        model: a Hugging Face text encoder (``AutoModel``: BERT, MPNet, ...) whose output has
            ``last_hidden_state``.
        tokenizer: its tokenizer (called with padding and truncation).
        normalize: divide each embedding by its L2 norm (sentence-transformers' ``Normalize``).
            Default: ``True``
        max_length: truncate longer texts to this many tokens. Default: the tokenizer's limit
            (sentence-transformers' ``all-mpnet-base-v2`` uses 384).
        batch_size: texts per forward pass. Default: ``64``

    Returns:
        (len(texts), E) float32 on the model's device, computed without gradients.
    """
    where = "embed_texts"
    texts = _check_texts(where, texts)
    if batch_size < 1:
        raise ValueError(f"{where}: batch_size expected a positive int, got {batch_size}")
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch).last_hidden_state
        chunks.append(mean_pool(hidden, batch["attention_mask"]).float())
    embeddings = torch.cat(chunks)
    if normalize:
        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    return embeddings


class TextEmbedder:
    """A frozen text encoder that turns instructions into unit-norm sentence embeddings.

    Deliberately not an ``nn.Module``: assigned as an attribute of a model it is not registered as a
    child, so its weights never land in the model's ``state_dict`` (the authors' model saved a path
    to its encoder and reported its weights missing on load).

    Args:
        model: a Hugging Face text encoder, or a local path / hub name loaded with ``AutoModel``
            (needs ``layerfuse[hf]``).
        tokenizer: its tokenizer. Default: ``AutoTokenizer`` from the same path (required when
            ``model`` is a module).
        normalize: L2-normalise the embeddings. Default: ``True``
        max_length: truncation length in tokens. Default: the tokenizer's limit
        device: move the model there. Default: leave it where it is

    Examples:
        >>> embedder = TextEmbedder("sentence-transformers/all-mpnet-base-v2", max_length=384)
        >>> fuser(features, text=embedder(["What is written on the sign?"] * len(images)))
    """

    def __init__(
        self,
        model: nn.Module | str | Path,
        tokenizer: Any = None,
        *,
        normalize: bool = True,
        max_length: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        where = "TextEmbedder"
        if isinstance(model, (str, Path)):
            transformers = require("transformers", extra="hf", purpose="TextEmbedder with a model path")
            if tokenizer is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
            model = transformers.AutoModel.from_pretrained(str(model))
        elif not isinstance(model, nn.Module):
            raise TypeError(f"{where}: model expected an nn.Module or a path, got {type(model).__name__}")
        if tokenizer is None:
            raise ValueError(f"{where}: tokenizer is required when model is a module")
        if device is not None:
            model = model.to(device)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.max_length = max_length

    @property
    def dim(self) -> int:
        """Embedding width E (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    def __call__(self, texts: Sequence[str], *, batch_size: int = 64) -> Tensor:
        """(len(texts), E) float32 embeddings; see [`embed_texts`][layerfuse.text.embed_texts]."""
        return embed_texts(
            texts, self.model, self.tokenizer, normalize=self.normalize, max_length=self.max_length,
            batch_size=batch_size,
        )

    def __repr__(self) -> str:
        return (
            f"TextEmbedder({type(self.model).__name__}, dim={self.dim}, normalize={self.normalize}, "
            f"max_length={self.max_length})"
        )
