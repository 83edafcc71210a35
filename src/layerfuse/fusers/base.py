"""The contract every fuser keeps: per-layer features in, one (B, N, out_dim) tensor out."""

from __future__ import annotations

from torch import nn

from ..serialization import PretrainedMixin

__all__ = ["Fuser"]


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
