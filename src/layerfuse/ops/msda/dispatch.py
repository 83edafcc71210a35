"""Backend registry of multi-scale deformable attention: explicit choice or automatic by device."""

from __future__ import annotations

from ..backends import BackendRegistry
from .common import MSDABackend

__all__ = ["REGISTRY", "backend_names", "get_backend", "register_backend", "select_backend", "unregister_backend"]

REGISTRY: BackendRegistry[MSDABackend] = BackendRegistry("ms_deform_attn", MSDABackend)

register_backend = REGISTRY.register
unregister_backend = REGISTRY.unregister
backend_names = REGISTRY.names
get_backend = REGISTRY.get
select_backend = REGISTRY.select
