"""Register layerfuse's fused LLaVA classes with transformers' Auto classes, without importing transformers.

``import layerfuse`` must stay light (torch + einops), yet ``AutoModelForImageTextToText.from_pretrained``
of a fused checkpoint must work once layerfuse is imported. So: if transformers is already imported the
classes are registered now; otherwise a one-shot import hook registers them right after transformers
finishes importing, whenever that happens.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

__all__ = ["install"]


def _register() -> None:
    import layerfuse.integrations.transformers  # noqa: F401  (importing registers)


class _Loader(importlib.abc.Loader):
    """transformers' own loader, plus the registration once its module has run."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        # get_source, get_resource_reader, ...: everything else is the wrapped loader's
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        # a transformers without the LLaVA classes must still import; using the integration then
        # raises the same ImportError with its cause
        with contextlib.suppress(ImportError):
            _register()


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers is imported, else once it is; a no-op without transformers."""
    if "transformers" in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None and not any(
        isinstance(f, _AfterTransformersImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterTransformersImport())
