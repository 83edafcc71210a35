"""Layer-wise representation similarity of vision backbones: metrics, band grouping, pictures."""

from .accumulator import SimilarityAccumulator
from .cka import LinearCKA
from .cosine import PooledCosine, TokenCosine
from .grouping import LayerGroups, group_layers
from .images import ImageFolderBatches, SyntheticImages
from .plot import plot_similarity
from .similarity import METRICS, LayerSimilarity, iter_image_batches, layer_similarity

__all__ = [
    "METRICS",
    "ImageFolderBatches",
    "LayerGroups",
    "LayerSimilarity",
    "LinearCKA",
    "PooledCosine",
    "SimilarityAccumulator",
    "SyntheticImages",
    "TokenCosine",
    "group_layers",
    "iter_image_batches",
    "layer_similarity",
    "plot_similarity",
]
