"""``save_pretrained`` / ``from_pretrained`` for every layerfuse module: safetensors + a JSON config.

A saved directory holds ``config.json`` (``{"class": ..., "config": {...}, "layerfuse_version": ...}``)
and ``model.safetensors``. The config is exactly the keyword arguments of the class constructor, so
``cls(**config)`` rebuilds the module before the weights are loaded with strict key checks.

Every file layerfuse reads goes through `read_json_file` or `load_tensor_file`, so a
truncated or malformed file is one ``ValueError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import pickle
from abc import ABCMeta, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ._checks import factory_kwargs
from ._optional import require
from ._version import __version__

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PretrainedMixin",
    "full_state_dict",
    "load_strict",
    "load_tensor_file",
    "read_json_file",
    "real_class",
    "unwrap_module",
]

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


def read_json_file(path: str | Path, *, where: str) -> dict[str, Any]:
    """The JSON object stored in ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not UTF-8 JSON, or holds something other than an object (a list, a
            string, ...); the message names the file, the line and column of a syntax error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where}: {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "the file is truncated or was edited by hand"
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: {path} is not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {path} expected a JSON object {{...}}, got a JSON {type(data).__name__}")
    return data


def load_tensor_file(path: str | Path, *, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or of a ``torch.save``\\ d dict (``.bin``, ``.pt``, ...), on
    the CPU. ``.bin`` files are read with ``weights_only=True`` (no code runs).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is truncated, corrupt or of another format (the reader's reason is quoted).
        TypeError: the file holds something other than a flat dict of tensors (e.g. a training
            checkpoint nesting the weights under a key).
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"{where}: {path} is a folder; pass the checkpoint file in it (e.g. mm_projector.bin, model.safetensors)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{where}: checkpoint file {path} does not exist")
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        st = require("safetensors.torch", extra="safetensors", purpose="reading .safetensors files")
        try:
            loaded: object = st.load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError, ValueError)
            raise ValueError(
                f"{where}: {path} ({size} bytes) is not a readable safetensors file: {err}; "
                "it is truncated, corrupt or not a safetensors file"
            ) from None
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"{where}: {path} ({size} bytes) is not a readable torch.save checkpoint: {reason}; "
                "it is truncated, corrupt, or holds objects other than tensors"
            ) from None
    if not isinstance(loaded, Mapping):
        raise TypeError(f"{where}: {path} holds a {type(loaded).__name__}, expected a dict of tensors")
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            hint = "; pass the nested state dict instead" if isinstance(value, Mapping) else ""
            raise TypeError(
                f"{where}: {path} entry {key!r} expected a tensor, got a {type(value).__name__}{hint}"
            )
    return dict(loaded)


def _is_wrapper_class(cls: type) -> bool:
    """A class generated by ``fully_shard`` (``FSDPMMFuser``) or ``replicate`` (``DDPMMFuser``): it
    mixes a torch.distributed class into a layerfuse one and is never a class to save or rebuild."""
    return any(base.__module__.startswith("torch.distributed") for base in cls.__bases__)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s ``OptimizedModule`` and DDP's ``DistributedDataParallel``
    wrappers (nested ones too). An FSDP2 (``fully_shard``) module is its own module and is returned as is."""
    while True:
        inner = getattr(module, "_orig_mod", None)  # torch.compile
        if inner is None and type(module).__name__ == "DistributedDataParallel":
            inner = module.module
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def real_class(module: nn.Module) -> type:
    """The layerfuse class of ``module``: what ``save_pretrained`` records.

    ``fully_shard`` swaps a module's class for a generated subclass (``FSDPMMFuser``) and
    ``torch.compile`` / DDP wrap it; the class that ``from_pretrained`` can rebuild is the first
    registered one found through the wrappers and the method resolution order.
    """
    module = unwrap_module(module)
    for cls in type(module).__mro__:
        if not _is_wrapper_class(cls) and PretrainedMixin.registry.get(cls.__name__) is cls:
            return cls
    return type(module)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of every entry of ``module``'s state dict, whole.

    Parameters sharded by FSDP2 (``DTensor``) are all-gathered, a collective: every rank of the
    module's mesh must call this. Keys lose the ``_orig_mod.`` component of compiled submodules, so
    they are those of the plain module.
    """
    state = {}
    for key, value in unwrap_module(module).state_dict().items():
        if hasattr(value, "full_tensor") and hasattr(value, "placements"):  # a DTensor
            value = value.full_tensor()
        # contiguous copies: safetensors refuses views and shared storage
        state[key.replace("_orig_mod.", "")] = value.detach().contiguous().cpu()
    return state


def _is_sharded(module: nn.Module) -> bool:
    return any(hasattr(p, "placements") for p in unwrap_module(module).parameters())


def _atomic_write(path: Path, write: Any) -> None:
    """``write(tmp)`` then rename over ``path``: a crash or a second writer never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        if not _is_wrapper_class(cls):
            PretrainedMixin.registry[cls.__name__] = cls

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-serialisable) that rebuild this module's architecture."""

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

        Works on the module itself, through ``torch.compile`` (``compiled.save_pretrained``) and on
        ``ddp.module``; the recorded class is the layerfuse class, never a wrapper. Files are written
        to a temporary name and renamed, so ranks that save the same replicated module at once never
        leave a half-written file.

        Under FSDP2 (``fully_shard``) the full tensors are all-gathered: call it on every rank (it is
        a collective, like ``torch.distributed.checkpoint.state_dict.get_model_state_dict``); rank 0
        writes and every rank returns once the files exist.

        Raises:
            TypeError: ``self`` is not an ``nn.Module``.
        """
        import torch.distributed as dist

        st = require("safetensors.torch", extra="safetensors", purpose="save_pretrained")
        if not isinstance(self, nn.Module):
            raise TypeError(f"save_pretrained: {type(self).__name__} is not an nn.Module")
        module = unwrap_module(self)
        cls = real_class(module)
        directory = Path(directory)
        sharded = _is_sharded(module)
        config = {"class": cls.__name__, "layerfuse_version": __version__, "config": module.get_config()}
        tensors = full_state_dict(module)  # collective under FSDP2: before any rank-dependent branch
        writes = not sharded or dist.get_rank() == 0
        if writes:
            directory.mkdir(parents=True, exist_ok=True)
            text = json.dumps(config, indent=2, sort_keys=True) + "\n"
            _atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(text))
            _atomic_write(
                directory / WEIGHTS_NAME, lambda tmp: st.save_file(tensors, str(tmp), metadata={"format": "pt"})
            )
        if sharded:
            dist.barrier()
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
        where = "from_pretrained"
        factory_kwargs(where, device, dtype)
        if not isinstance(directory, str | Path):
            raise TypeError(f"{where}: directory expected a folder path (str or Path), got {type(directory).__name__}")
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{where}: no {CONFIG_NAME} in {directory}")
        saved = read_json_file(config_path, where=where)
        name = saved.get("class")
        if not isinstance(name, str):
            raise ValueError(
                f"{where}: {config_path} expected a \"class\" field naming a layerfuse class, got {name!r}; "
                "it was not written by save_pretrained"
            )
        target = PretrainedMixin.registry.get(name)
        if target is None:
            raise ValueError(
                f"{where}: {config_path} names class {name!r}, which layerfuse does not know; "
                f"known: {', '.join(sorted(PretrainedMixin.registry))}"
            )
        if not issubclass(target, cls):
            raise TypeError(f"{where}: {directory} holds a {name}, not a {cls.__name__}")
        config = saved.get("config")
        if not isinstance(config, dict):
            found = "no \"config\" field" if "config" not in saved else f"a {type(config).__name__}"
            raise ValueError(
                f"{where}: {config_path} expected a \"config\" object with the {name} constructor arguments, "
                f"found {found}"
            )
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(f"{where}: no {WEIGHTS_NAME} in {directory} (next to {CONFIG_NAME})")
        state = load_tensor_file(weights_path, where=where)
        if dtype is None:
            floats = {v.dtype for v in state.values() if v.is_floating_point()}
            dtype = floats.pop() if len(floats) == 1 else None
        try:
            module = target.from_config(config, device=device, dtype=dtype)
        except (TypeError, ValueError, KeyError) as err:
            error = TypeError if isinstance(err, TypeError) else ValueError
            raise error(f"{where}: the \"config\" of {config_path} does not build a {name}: {err}") from None
        load_strict(module, state, source=f"{where}({str(directory)!r})")  # type: ignore[arg-type]
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
