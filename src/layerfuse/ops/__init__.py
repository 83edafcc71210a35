"""Parameter-free math and kernels: deformable sampling, attention dispatch, layer means.

The attention op lives in its own subpackage, ``layerfuse.ops.attention`` (``from
layerfuse.ops.attention import attention``), beside its backends; it is not re-exported here so that
the name ``layerfuse.ops.attention`` always means that subpackage.
"""

from .layer_mean import layer_mean
from .msda import ms_deform_attn
from .reference_points import reference_points

__all__ = ["layer_mean", "ms_deform_attn", "reference_points"]
