"""The contract every fuser keeps: per-layer features in, one (B, N, out_dim) tensor out."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from ..serialization import PretrainedMixin

__all__ = ["Fuser"]

F = TypeVar("F", bound="Fuser")


class Fuser(PretrainedMixin, nn.Module):
    """Base class of all fusers.

    A fuser takes a sequence of per-layer features, each (B, N_i, C_i), in the order of its
    ``layers`` (shallow key/value layers first and the query layer last for the attention fusers), and
    returns one (B, N, ``out_dim``) tensor. Subclasses set ``in_dims`` and ``out_dim`` in ``__init__``
    (so a caller can size the projector) and implement ``get_config`` (constructor keyword arguments,
    for ``save_pretrained``), ``reset_parameters`` and ``extra_repr``.
    """

    in_dims: tuple[int, ...]
    out_dim: int

    @property
    def num_inputs(self) -> int:
        """How many per-layer tensors ``forward`` expects."""
        return len(self.in_dims)

    @classmethod
    def from_preset(
        cls: type[F],
        name: str,
        dim: int,
        depth: int = 24,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> F:
        """A published configuration by name, e.g. ``ConcatFuser.from_preset("dense_connector_dci", 1024)``.

        ``dim`` is the ViT width and ``depth`` its number of blocks; `layerfuse.presets` lists the
        names, their layers and the paper each comes from. Raises ``TypeError`` if the preset builds
        another fuser class.
        """
        from ..presets import build_fuser

        return build_fuser(name, dim=dim, depth=depth, expect=cls, device=device, dtype=dtype)
