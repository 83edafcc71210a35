"""Build a backbone from a command-line spec (``timm:<name>`` or ``hf:<dir>``) without any download."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .._optional import require
from ..convert.state_dict import load_checkpoint_file
from ..serialization import load_strict, read_json_file

__all__ = ["LoadedModel", "load_model"]

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# transformers' default for image processors that do not state their normalisation.
_HF_DEFAULT_MEAN_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class LoadedModel:
    """A backbone in eval mode and the preprocessing its inputs need.

    Attributes:
        model: the module to tap.
        image_size: side of the square input, in pixels.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        crop_pct: fraction of the resized image the centre crop keeps.
        weights: where the weights came from: ``"random"``, a checkpoint file or a model folder.
    """

    model: nn.Module
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    weights: str


def load_model(spec: str, *, checkpoint: str | Path | None = None, image_size: int | None = None) -> LoadedModel:
    """Build the backbone named by ``spec``, offline.

    ``timm:<name>`` builds ``timm.create_model(name, pretrained=False)`` (random weights; ``img_size``
    set from ``image_size``) and takes preprocessing from timm's data config. ``hf:<dir>`` reads a local
    transformers folder: its weights when the folder has them, else random weights from its
    ``config.json``; ``image_size`` overrides the config's, and mean/std come from
    ``preprocessor_config.json`` when present (0.5 otherwise). ``checkpoint`` (``.safetensors`` or a
    ``torch.save``\\ d state dict) replaces the weights, with every key and shape checked.
    """
    where = "load_model"
    family, sep, name = spec.partition(":")
    if not sep or not name or family not in ("timm", "hf"):
        raise ValueError(f"{where}: model expected 'timm:<name>' or 'hf:<folder>', got {spec!r}")
    loaded = _timm_model(name, image_size) if family == "timm" else _hf_model(Path(name), image_size, checkpoint)
    if checkpoint is not None:
        load_strict(loaded.model, load_checkpoint_file(checkpoint, where=where), source=str(checkpoint))
        loaded = LoadedModel(loaded.model, loaded.image_size, loaded.mean, loaded.std, loaded.crop_pct, str(checkpoint))
    loaded.model.eval()
    return loaded


def _timm_model(name: str, image_size: int | None) -> LoadedModel:
    timm = require("timm", extra="timm", purpose="--model timm:<name>")
    if not timm.is_model(name):
        raise ValueError(f"load_model: timm has no model named {name!r} (see timm.list_models())")
    model = timm.create_model(name, pretrained=False, **({"img_size": image_size} if image_size else {}))
    config = timm.data.resolve_model_data_config(model)
    # The pretrained config keeps the default input size; an explicit img_size wins over it.
    height, width = (image_size, image_size) if image_size else config["input_size"][-2:]
    if height != width:
        raise ValueError(f"load_model: timm:{name} takes non-square {height}x{width} inputs; only square inputs are supported")
    return LoadedModel(model, int(height), tuple(config["mean"]), tuple(config["std"]), float(config["crop_pct"]), "random")


def _hf_model(folder: Path, image_size: int | None, checkpoint: str | Path | None) -> LoadedModel:
    transformers = require("transformers", extra="hf", purpose="--model hf:<folder>")
    if not (folder / "config.json").is_file():
        raise ValueError(f"load_model: hf:{folder} expected a local folder with a config.json (no downloads are made)")
    read_json_file(folder / "config.json", where="load_model")  # a malformed file fails here, named
    config = transformers.AutoConfig.from_pretrained(folder)
    vision = getattr(config, "vision_config", config)
    if image_size:
        vision.image_size = image_size
    has_weights = any((folder / f).is_file() for f in _HF_WEIGHTS)
    if has_weights and checkpoint is None:
        try:
            model, weights = transformers.AutoModel.from_pretrained(folder, config=config), str(folder)
        except Exception as err:  # transformers re-raises safetensors/torch.load errors that name no file
            raise ValueError(f"load_model: the weights in hf:{folder} cannot be read: {err}") from None
    else:
        model, weights = transformers.AutoModel.from_config(config), "random"
    mean = std = _HF_DEFAULT_MEAN_STD
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        settings = read_json_file(processor, where="load_model")
        mean = tuple(settings.get("image_mean", mean))
        std = tuple(settings.get("image_std", std))
    return LoadedModel(model, int(vision.image_size), mean, std, 1.0, weights)
