"""``save_pretrained`` / ``from_pretrained`` for every layerfuse module: safetensors + a JSON config.

A saved directory holds ``config.json`` (``{"class": ..., "config": {...}, "layerfuse_version": ...}``)
and ``model.safetensors``. The config is exactly the keyword arguments of the class constructor, so
``cls(**config)`` rebuilds the module before the weights are loaded with strict key checks.
"""

from __future__ import annotations

import json
from abc import ABCMeta, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ._optional import require
from ._version import __version__

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PretrainedMixin", "load_strict"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

T = TypeVar("T", bound="PretrainedMixin")


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state_dict`` into ``module`` only if the key sets and shapes match exactly.

    Unlike ``load_state_dict(strict=True)``, nothing is copied when the check fails, and the error lists
    every missing key, unexpected key and shape mismatch at once.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and expected[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source}: the weights do not fit {type(module).__name__}; nothing was loaded."]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


class PretrainedMixin(metaclass=ABCMeta):
    """Adds ``save_pretrained`` / ``from_pretrained`` to an ``nn.Module`` subclass.

    Subclasses implement [`get_config`][layerfuse.serialization.PretrainedMixin.get_config], returning the JSON-serialisable constructor keyword
    arguments. Every concrete subclass is registered by class name, so
    ``PretrainedMixin.from_pretrained(path)`` rebuilds whichever class was saved, while
    ``ConcatFuser.from_pretrained(path)`` also checks that the saved class is a ``ConcatFuser``.
    """

    registry: ClassVar[dict[str, type[PretrainedMixin]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        PretrainedMixin.registry[cls.__name__] = cls

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-serialisable) that rebuild this module's architecture."""

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
        st = require("safetensors.torch", extra="safetensors", purpose="save_pretrained")
        if not isinstance(self, nn.Module):
            raise TypeError(f"save_pretrained: {type(self).__name__} is not an nn.Module")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"class": type(self).__name__, "layerfuse_version": __version__, "config": self.get_config()}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # contiguous copies: safetensors refuses views and shared storage
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        st.save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(
        cls: type[T],
        directory: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> T:
        """Rebuild a module saved by [`save_pretrained`][layerfuse.serialization.PretrainedMixin.save_pretrained]; keys and shapes must match exactly.

        Args:
            directory: the folder written by ``save_pretrained``.
            device: where to build the module. Default: CPU.
            dtype: build in this dtype (the stored weights are cast). Default: the stored dtype.
        """
        st = require("safetensors.torch", extra="safetensors", purpose="from_pretrained")
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"from_pretrained: no {CONFIG_NAME} in {directory}")
        saved = json.loads(config_path.read_text())
        name = saved.get("class")
        target = PretrainedMixin.registry.get(name) if isinstance(name, str) else None
        if target is None:
            raise ValueError(
                f"from_pretrained: {config_path} names class {name!r}, which layerfuse does not know; "
                f"known: {', '.join(sorted(PretrainedMixin.registry))}"
            )
        if not issubclass(target, cls):
            raise TypeError(f"from_pretrained: {directory} holds a {name}, not a {cls.__name__}")
        state = st.load_file(str(directory / WEIGHTS_NAME))
        if dtype is None:
            floats = {v.dtype for v in state.values() if v.is_floating_point()}
            dtype = floats.pop() if len(floats) == 1 else None
        module = target.from_config(saved["config"], device=device, dtype=dtype)
        load_strict(module, state, source=f"from_pretrained({str(directory)!r})")  # type: ignore[arg-type]
        return module  # type: ignore[return-value]

    @classmethod
    def from_config(
        cls: type[T],
        config: dict[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> T:
        """Build the architecture described by ``config`` (fresh parameters).

        Override when the config nests other modules; the default is ``cls(**config, device=, dtype=)``.
        """
        return cls(**config, device=device, dtype=dtype)  # type: ignore[call-arg]
