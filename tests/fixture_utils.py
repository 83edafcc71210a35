"""Reading the reference fixtures (outputs of the authors' code) and comparing against them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

FIXTURES = Path(__file__).parent / "fixtures"
REL_TOL = 1e-10  # fixtures/README.md §1.3


@dataclass
class Fixture:
    name: str
    config: dict
    tensors: dict[str, Tensor]

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def with_prefix(self, prefix: str) -> dict[str, Tensor]:
        """Tensors named ``<prefix><rest>``, keyed by ``<rest>``."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def checkpoint(self, prefix: str | None = None) -> dict[str, Tensor]:
        """The stored parameters under their full checkpoint keys (README §1.4): ``prefix`` (default
        ``config.checkpoint_key_prefix``) in front of each ``param.<key>``."""
        prefix = self.config["checkpoint_key_prefix"] if prefix is None else prefix
        return {prefix + k: v for k, v in self.with_prefix("param.").items()}

    def hidden_states(self) -> list[Tensor]:
        hidden = self.with_prefix("hidden.")
        return [hidden[str(i)] for i in range(len(hidden))]

    def inputs(self) -> list[Tensor]:
        inputs = self.with_prefix("input.")
        return [inputs[str(i)] for i in range(len(inputs))]


def load_fixture(name: str) -> Fixture:
    from safetensors import safe_open

    path = FIXTURES / f"{name}.safetensors"
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensors[key] = f.get_tensor(key)
    return Fixture(name=name, config=json.loads(metadata["config"]), tensors=tensors)


def assert_fixture_close(actual: Tensor, expected: Tensor, *, name: str, rel: float = REL_TOL) -> None:
    """max|actual - expected| <= rel * max|expected|, with identical shapes, compared in float64."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    actual64, expected64 = actual.detach().to(torch.float64), expected.to(torch.float64)
    err = (actual64 - expected64).abs().max().item()
    scale = expected64.abs().max().item()
    assert err <= rel * scale, f"{name}: max abs error {err:.3e} > {rel:.0e} * {scale:.3e}"


def tap_fixture(fixture: Fixture, layers, tokens: str) -> list[Tensor]:
    """What ``LayerTap(vit, layers, tokens=tokens)`` returns for the fixture's hidden states.

    ``"patch"`` drops the CLS token when the fixture's tower has one (``config.has_cls``); SigLIP-style
    towers have no prefix token, so every token is kept.
    """
    hidden = fixture.hidden_states()
    drop = 1 if tokens == "patch" and fixture.config["has_cls"] else 0
    return [hidden[k][:, drop:] for k in layers]
