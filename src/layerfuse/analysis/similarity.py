"""Layer-by-layer representation similarity of a vision backbone over a stream of images."""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_positive_int
from .._optional import require
from ..taps import LayerTap
from .accumulator import SimilarityAccumulator
from .cka import LinearCKA
from .cosine import PooledCosine, TokenCosine

__all__ = ["METRICS", "LayerSimilarity", "iter_image_batches", "layer_similarity"]

METRICS: dict[str, type[SimilarityAccumulator]] = {
    TokenCosine.name: TokenCosine,
    PooledCosine.name: PooledCosine,
    LinearCKA.name: LinearCKA,
}

_WHERE = "layer_similarity"


@dataclass(frozen=True, eq=False)
class LayerSimilarity:
    """An (L, L) layer-similarity matrix and what it was computed from.

    Attributes:
        matrix: (L, L) float64 tensor on the CPU, symmetric; row/column k is layer ``layers[k]``.
        layers: the hidden-state index of each row, as the tap reports it (0 = embedding output).
        metric: ``"cosine"``, ``"pooled_cosine"`` or ``"cka"``.
        num_images: how many images were averaged over.
        tokens: which tokens the tap kept (``"patch"``, ``"cls_patch"``, ``"all"``), or ``None`` when
            features came from a plain callable.
        model: what was measured, for titles and records: the model's name (timm architecture,
            Hugging Face ``name_or_path``, else its class name) or what the caller set; ``None``
            for a plain callable.
    """

    matrix: Tensor
    layers: tuple[int, ...]
    metric: str
    num_images: int
    tokens: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.matrix.shape)
        if self.matrix.ndim != 2 or shape[0] != shape[1] or shape[0] != len(self.layers):
            raise ValueError(
                f"LayerSimilarity: matrix expected shape ({len(self.layers)}, {len(self.layers)}) for "
                f"layers {self.layers}, got {shape}"
            )

    def subset(self, layers: Iterable[int]) -> LayerSimilarity:
        """The same result restricted to ``layers`` (hidden-state indices, in the order given)."""
        layers = tuple(layers)
        missing = [k for k in layers if k not in self.layers]
        if missing:
            raise ValueError(f"LayerSimilarity.subset: layers {missing} are not among {self.layers}")
        index = torch.tensor([self.layers.index(k) for k in layers], dtype=torch.long)
        return LayerSimilarity(
            self.matrix[index][:, index], layers, self.metric, self.num_images, self.tokens, self.model
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the matrix as nested lists of floats); [`from_dict`][layerfuse.analysis.LayerSimilarity.from_dict]
        reads it back."""
        return {
            "model": self.model,
            "metric": self.metric,
            "tokens": self.tokens,
            "num_images": self.num_images,
            "layers": list(self.layers),
            "matrix": self.matrix.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> LayerSimilarity:
        """The result that [`to_dict`][layerfuse.analysis.LayerSimilarity.to_dict] wrote, without
        recomputing anything.

        Other keys (the ``layerfuse similarity`` JSON also holds its bands) are ignored; ``model`` and
        ``tokens`` may be missing (older files).

        Args:
            data: a mapping with ``matrix`` (L lists of L numbers), ``layers`` (L ints), ``metric``
                and ``num_images``.
            source: named in error messages (e.g. the file it came from).

        Raises:
            ValueError: a required key is missing, a value has the wrong type, or the matrix is not
                (L, L) for the L layers.
        """
        where = "LayerSimilarity.from_dict" + (f" ({source})" if source else "")
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        missing = [key for key in ("matrix", "layers", "metric", "num_images") if key not in data]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; got keys {sorted(data)}")
        layers, metric, num_images = data["layers"], data["metric"], data["num_images"]
        if not isinstance(layers, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in layers):
            raise ValueError(f"{where}: layers expected a list of ints, got {layers!r}")
        if metric not in METRICS:
            raise ValueError(f"{where}: metric expected one of {sorted(METRICS)}, got {metric!r}")
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
            raise ValueError(f"{where}: num_images expected a positive int, got {num_images!r}")
        try:
            matrix = torch.tensor(data["matrix"], dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: matrix expected L lists of L numbers ({err})") from None
        if matrix.shape != (len(layers), len(layers)):
            raise ValueError(
                f"{where}: matrix expected shape ({len(layers)}, {len(layers)}) for layers {layers}, "
                f"got {tuple(matrix.shape)}"
            )
        return cls(matrix, tuple(layers), metric, num_images, data.get("tokens"), data.get("model"))

    @classmethod
    def from_json(cls, path: str | Path) -> LayerSimilarity:
        """Read a result saved as JSON (by ``json.dump(result.to_dict())`` or ``layerfuse similarity
        --json``), e.g. to plot it again without the model.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not JSON or not a saved result (see
                [`from_dict`][layerfuse.analysis.LayerSimilarity.from_dict]).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LayerSimilarity.from_json: {str(path)!r} is not a file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"LayerSimilarity.from_json: {str(path)!r} is not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))


def layer_similarity(
    tap_or_model: Any,
    images: Tensor | Iterable[Any],
    *,
    metric: str = "cosine",
    layers: Sequence[int] | str | None = None,
    tokens: str | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
    device: torch.device | str | None = None,
) -> LayerSimilarity:
    """Similarity between every pair of layers of a backbone, averaged over images.

    Features are reduced batch by batch into float64 running sums (see [`TokenCosine`][layerfuse.analysis.TokenCosine],
    [`PooledCosine`][layerfuse.analysis.PooledCosine], [`LinearCKA`][layerfuse.analysis.LinearCKA]), so memory does not grow with the number of images and
    the result does not depend on the batch size. The backbone runs under ``torch.inference_mode``
    and in eval mode; the train/eval flags of its modules are restored afterwards.

    Args:
        tap_or_model: a [`layerfuse.LayerTap`][layerfuse.LayerTap]; a timm / Hugging Face / open_clip model, wrapped in
            ``LayerTap(model, layers, tokens=tokens)``; or any callable mapping an image batch to a
            sequence of (B, N, C) tensors (its ``.layers`` is used when it returns
            [`layerfuse.LayerFeatures`][layerfuse.LayerFeatures]).
        images: a (B, 3, H, W) tensor (split into ``batch_size`` chunks), or an iterable of batches
            (a DataLoader) whose items are tensors, ``(images, labels, ...)`` tuples or dicts with
            ``"pixel_values"``. Batches are moved to the model's device.
        metric: ``"cosine"`` (token-aligned, default), ``"pooled_cosine"`` or ``"cka"`` (linear CKA).
        layers: hidden-state indices to compare when a model is given. Default: ``"all"``.
        tokens: tokens the tap keeps when a model is given. Default: ``"patch"``.
        batch_size: chunk size used only when ``images`` is one tensor.
        progress: a tqdm progress bar counting images. ``None`` (default): shown when tqdm is
            installed (``analysis`` extra), else none; ``True``: required (ImportError without
            tqdm); ``False``: never.
        device: where the running sums live. Default: the device of the features.

    Returns:
        A [`LayerSimilarity`][layerfuse.analysis.LayerSimilarity] with the (L, L) float64 matrix.

    Examples:
        >>> import timm, torch
        >>> from layerfuse.analysis import group_layers, layer_similarity
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        >>> result = layer_similarity(vit, torch.randn(8, 3, 224, 224), progress=False)
        >>> group_layers(result.subset(range(1, 13)), k=3).bands  # doctest: +SKIP
    """
    check_choice(_WHERE, "metric", metric, tuple(METRICS))
    check_positive_int(_WHERE, "batch_size", batch_size)
    tqdm = _progress_module(progress)
    extract, model, tokens, owned = _feature_extractor(tap_or_model, layers, tokens)
    input_device = _parameter_device(model)
    batches = iter_image_batches(images, batch_size=batch_size, where=_WHERE)

    accumulator = METRICS[metric](device=device)
    layer_ids: tuple[int, ...] = ()
    with contextlib.ExitStack() as stack:
        if owned:
            stack.enter_context(extract)  # removes the hooks of the tap built here
        # The bar counts images, not batches: a few large batches would otherwise sit at 0/1.
        bar = None if tqdm is None else stack.enter_context(
            tqdm.tqdm(total=_num_images(images), desc=metric, unit="image"))
        stack.enter_context(_eval_mode(model))
        stack.enter_context(torch.inference_mode())
        for x in batches:
            features = extract(x if input_device is None else x.to(input_device))
            accumulator.update(features)
            layer_ids = tuple(getattr(features, "layers", ()))
            if bar is not None:
                bar.update(x.shape[0])
    if accumulator.num_images == 0:
        raise ValueError(f"{_WHERE}: images yielded no batches")
    matrix = accumulator.compute()
    # A tap reports negative indices as given; rows are labelled with absolute hidden-state indices.
    layer_ids = tuple(getattr(extract, "resolved_layers", layer_ids))
    if len(layer_ids) != matrix.shape[0]:
        layer_ids = tuple(range(matrix.shape[0]))
    return LayerSimilarity(matrix, layer_ids, metric, accumulator.num_images, tokens, _model_name(model))


def iter_image_batches(
    images: Tensor | Iterable[Any], *, batch_size: int = 32, where: str = "iter_image_batches"
) -> Iterator[Tensor]:
    """Yield (B, 3, H, W) tensors from a tensor, a DataLoader or any iterable of batches.

    A tensor is split along its first axis into chunks of ``batch_size``. Items of an iterable may be
    tensors, tuples/lists whose first entry is the image tensor, or dicts with ``"pixel_values"``.
    """
    if isinstance(images, Tensor):
        _check_image_batch(where, "images", images)
        yield from images.split(batch_size)
        return
    if not isinstance(images, Iterable) or isinstance(images, (str, bytes, Mapping)):
        raise TypeError(
            f"{where}: images expected a (B, 3, H, W) tensor or an iterable of batches (e.g. a DataLoader), "
            f"got {type(images).__name__}"
        )
    for i, item in enumerate(images):
        if isinstance(item, (tuple, list)) and item:
            item = item[0]
        elif isinstance(item, Mapping):
            if "pixel_values" not in item:
                raise ValueError(
                    f"{where}: batch {i} is a dict without 'pixel_values'; got keys {sorted(item)}"
                )
            item = item["pixel_values"]
        if not isinstance(item, Tensor):
            raise TypeError(
                f"{where}: batch {i} expected a tensor, an (images, labels) tuple or a dict with "
                f"'pixel_values', got {type(item).__name__}"
            )
        _check_image_batch(where, f"batch {i}", item)
        yield item


def _check_image_batch(where: str, name: str, x: Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            f"{where}: {name} expected a floating-point image batch (B, C, H, W), got shape "
            f"{tuple(x.shape)} and dtype {x.dtype}"
        )


def _num_images(images: Any) -> int | None:
    """The number of images ``images`` will yield when it says so (a tensor, an object with
    ``num_images``, a DataLoader over a sized dataset), else ``None`` (the bar counts up open-ended)."""
    if isinstance(images, Tensor):
        return images.shape[0]
    count = getattr(images, "num_images", None)
    if isinstance(count, int):
        return count
    dataset = getattr(images, "dataset", None)
    if dataset is not None and getattr(images, "drop_last", False) is False:
        with contextlib.suppress(TypeError):
            return len(dataset)
    return None


def _progress_module(progress: bool | None) -> Any:
    if progress is False:
        return None
    if progress:
        return require("tqdm", extra="analysis", purpose="layer_similarity(progress=True)")
    try:
        return importlib.import_module("tqdm")
    except ImportError:  # core install: no bar rather than an error
        return None


def _model_name(model: nn.Module | None) -> str | None:
    if model is None:
        return None
    timm_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(timm_cfg, Mapping) and timm_cfg.get("architecture"):
        return str(timm_cfg["architecture"])
    hf_name = getattr(getattr(model, "config", None), "name_or_path", None)
    if isinstance(hf_name, str) and hf_name:
        return hf_name
    return type(model).__name__


def _feature_extractor(
    tap_or_model: Any, layers: Sequence[int] | str | None, tokens: str | None
) -> tuple[Callable[[Tensor], Sequence[Tensor]], nn.Module | None, str | None, bool]:
    """The feature callable, the module whose mode and device matter, the token set, and whether the
    callable is a tap built here (to be removed after use)."""
    if isinstance(tap_or_model, LayerTap):
        if layers is not None or tokens is not None:
            raise ValueError(
                f"{_WHERE}: layers and tokens are set on the LayerTap; pass them only with a model, "
                f"got layers={layers!r}, tokens={tokens!r}"
            )
        return tap_or_model, tap_or_model.model, tap_or_model.tokens, False
    if isinstance(tap_or_model, nn.Module):
        tokens = "patch" if tokens is None else tokens
        tap = LayerTap(tap_or_model, "all" if layers is None else layers, tokens=tokens)
        return tap, tap_or_model, tokens, True
    if callable(tap_or_model):
        if layers is not None or tokens is not None:
            raise ValueError(
                f"{_WHERE}: layers and tokens apply only when a model is given; a plain callable chooses "
                f"its own features, got layers={layers!r}, tokens={tokens!r}"
            )
        return tap_or_model, None, None, False
    raise TypeError(
        f"{_WHERE}: tap_or_model expected a LayerTap, an nn.Module or a callable returning per-layer "
        f"features, got {type(tap_or_model).__name__}"
    )


def _parameter_device(model: nn.Module | None) -> torch.device | None:
    if model is None:
        return None
    first = next(model.parameters(), None)
    return None if first is None else first.device


@contextlib.contextmanager
def _eval_mode(model: nn.Module | None) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout or drop-path), then restore every module's flag."""
    if model is None:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
