"""Parameter-free math and kernels: deformable sampling and attention dispatch."""

from .attention import attention
from .layer_mean import layer_mean
from .msda import ms_deform_attn
from .reference_points import reference_points

__all__: list[str] = ["attention", "layer_mean", "ms_deform_attn", "reference_points"]
