"""Lazy imports of optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["install_hint", "is_available", "require"]


def is_available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


def install_hint(extra: str) -> str:
    """How to install the ``layerfuse`` extra ``extra``, for messages.

    layerfuse is not on the package index, so installing ``layerfuse[extra]`` from it finds nothing:
    the extra is installed from the checkout (or a built wheel) that layerfuse came from.
    """
    wheel = f'pip install "$(ls dist/layerfuse-*.whl)[{extra}]"'
    return f"pip install '.[{extra}]' in the layerfuse checkout; from a built wheel, {wheel}"


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that says which extra provides it.

    Args:
        module: dotted module name, e.g. ``"timm"`` or ``"safetensors.torch"``.
        extra: the ``layerfuse`` extra that installs it, e.g. ``"timm"``.
        purpose: what needs it, completing "``<purpose>`` needs ``<module>``".
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs the optional dependency {module.split('.')[0]!r}, which is not installed; "
            f"install the extra {extra!r} with: {install_hint(extra)}"
        ) from err
