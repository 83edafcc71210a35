"""IGVA's instruction embeddings in a Hugging Face data pipeline: one embedding per sample, from its user turn."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...text import TextEmbedder

__all__ = ["InstructionCollator", "user_turn"]

# LLaVA's image placeholder and the blank lines around it are not part of the instruction
_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")


def user_turn(conversation: Sequence[dict[str, Any]]) -> str:
    """The first user message of a conversation, without ``<image>`` placeholders.

    Accepts LLaVA's format (``{"from": "human", "value": "<image>\\nWhat ...?"}``) and the chat-template
    format (``{"role": "user", "content": "..."}`` or a list of ``{"type": "text", "text": ...}`` parts).
    Returns ``""`` when there is no user text (IGVA then uses a zero embedding).
    """
    for turn in conversation:
        if turn.get("from") == "human" or turn.get("role") == "user":
            content = turn.get("value", turn.get("content", ""))
            if not isinstance(content, str):
                content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
            return _IMAGE_TOKEN.sub(" ", content).strip()
    return ""


class InstructionCollator:
    """Wraps a data collator and adds ``instruction_embeds`` (B, E) computed with a [`TextEmbedder`][layerfuse.text.TextEmbedder].

    Each sample carries its instruction text under ``key`` (a string) or a conversation under
    ``conversation_key`` (its [`user_turn`][layerfuse.integrations.transformers.user_turn] is used);
    the key is removed before the wrapped collator runs. A sample with an empty instruction gets a zero
    row, as in the IGVA authors' code. The batch then goes straight into a fused model's ``forward`` /
    ``generate`` or a ``Trainer``.

    Args:
        embedder: the frozen text encoder (``all-mpnet-base-v2`` for the authors' checkpoints).
        collate: the collator that builds ``input_ids``, ``labels``, ``pixel_values``, ...
        key: sample field holding the instruction text. Default: ``"instruction"``
        conversation_key: sample field holding a conversation, used when ``key`` is absent.
            Default: ``"conversations"``

    Examples:
        A sketch (``encoder`` / ``tokenizer``: any HF sentence encoder, e.g. a 768-wide one):

        ```python
        collator = InstructionCollator(TextEmbedder(encoder, tokenizer), default_data_collator)
        batch = collator([{"instruction": "What is on the table?", "input_ids": ..., ...}])
        batch["instruction_embeds"].shape  # torch.Size([1, 768])
        ```
    """

    def __init__(
        self,
        embedder: TextEmbedder,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        *,
        key: str = "instruction",
        conversation_key: str = "conversations",
    ) -> None:
        if not callable(embedder) or not hasattr(embedder, "dim"):
            raise TypeError(f"InstructionCollator: embedder expected a TextEmbedder, got {type(embedder).__name__}")
        self.embedder, self.collate = embedder, collate
        self.key, self.conversation_key = key, conversation_key

    def _text(self, i: int, sample: dict[str, Any]) -> str:
        if self.key in sample:
            text = sample.pop(self.key)
        elif self.conversation_key in sample:
            text = user_turn(sample[self.conversation_key])
        else:
            raise ValueError(
                f"InstructionCollator: sample {i} has neither {self.key!r} nor {self.conversation_key!r}; "
                f"got keys {sorted(sample)}"
            )
        if not isinstance(text, str):
            raise TypeError(f"InstructionCollator: sample {i} {self.key!r} expected a str, got {type(text).__name__}")
        return text.strip()

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        samples = [dict(s) for s in samples]
        texts = [self._text(i, s) for i, s in enumerate(samples)]
        for s in samples:
            s.pop(self.conversation_key, None)
        batch = dict(self.collate(samples))
        embeds = torch.zeros(len(texts), self.embedder.dim)
        present = [i for i, t in enumerate(texts) if t]
        if present:
            embeds[present] = self.embedder([texts[i] for i in present]).to(embeds.device)
        batch["instruction_embeds"] = embeds
        return batch
