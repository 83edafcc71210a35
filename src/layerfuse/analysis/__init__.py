"""Layer-wise representation similarity of vision backbones: metrics, band grouping, pictures."""

from .accumulator import SimilarityAccumulator
from .cka import LinearCKA
from .cosine import PooledCosine, TokenCosine
from .grouping import LayerGroups, group_layers
from .images import ImageFiles, ImageFolderBatches, SyntheticImages, find_images
from .plot import plot_similarity
from .similarity import METRICS, LayerSimilarity, iter_image_batches, layer_similarity

__all__ = [
    "METRICS",
    "ImageFiles",
    "ImageFolderBatches",
    "LayerGroups",
    "LayerSimilarity",
    "LinearCKA",
    "PooledCosine",
    "SimilarityAccumulator",
    "SyntheticImages",
    "TokenCosine",
    "find_images",
    "group_layers",
    "iter_image_batches",
    "layer_similarity",
    "plot_similarity",
]
