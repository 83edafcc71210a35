"""Image batches for analysis runs: a folder of image files, or random images."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .._checks import check_float, check_float_list, check_positive_int
from .._optional import require

# b batch, c channels, h/w pixel rows/columns

__all__ = ["IMAGE_SUFFIXES", "ImageFolderBatches", "SyntheticImages"]

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


class ImageFolderBatches:
    """Normalised (B, 3, S, S) batches of every image file under a folder, in sorted path order.

    Each image is converted to RGB, resized (bicubic, antialiased) so its shorter side is
    ``round(image_size / crop_pct)``, centre-cropped to ``image_size`` × ``image_size``, scaled to
    [0, 1] and normalised with ``mean`` / ``std``: timm's evaluation transform, and the CLIP image
    processor's for ``crop_pct=1``. Files are read lazily, one batch at a time. Needs Pillow (installed
    with the ``analysis`` extra, through matplotlib).

    Args:
        root: folder searched recursively for files ending in one of ``IMAGE_SUFFIXES``.
        image_size: side S of the square model input.
        mean: per-channel mean of the model's normalisation.
        std: per-channel standard deviation of the model's normalisation.
        batch_size: images per batch (the last batch may be smaller).
        crop_pct: fraction of the resized image kept by the centre crop, in (0, 1].
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int = 32,
        crop_pct: float = 1.0,
    ) -> None:
        where = "ImageFolderBatches"
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{where}: root {str(self.root)!r} is not a folder")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ValueError(
                f"{where}: no image files ({', '.join(IMAGE_SUFFIXES)}) under {str(self.root)!r}"
            )
        mean = check_float_list(where, "mean", mean, length=3)
        std = check_float_list(where, "std", std, length=3)
        for i, s in enumerate(std):
            check_float(where, f"std[{i}]", s, low=0.0, low_open=True)
        crop_pct = check_float(where, "crop_pct", crop_pct, low=0.0, high=1.0, low_open=True)
        self.image_size = check_positive_int(where, "image_size", image_size)
        self.batch_size = check_positive_int(where, "batch_size", batch_size)
        self.crop_pct = crop_pct
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        for start in range(0, len(self.files), self.batch_size):
            yield torch.stack([self.load(p) for p in self.files[start : start + self.batch_size]])

    def load(self, path: str | Path) -> Tensor:
        """One image file as a normalised (3, S, S) float32 tensor."""
        pil_image = require("PIL.Image", extra="analysis", purpose="reading image files")
        try:
            with pil_image.open(path) as img:
                rgb = img.convert("RGB")
                width, height = rgb.size
                data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        except OSError as err:  # PIL's truncated-file error does not name the file
            raise ValueError(f"ImageFolderBatches: {path} is not a readable image ({err})") from None
        x = rearrange(data, "(h w c) -> 1 c h w", h=height, w=width, c=3).float() / 255
        short = round(self.image_size / self.crop_pct)
        scale = short / min(height, width)
        size = (max(short, round(height * scale)), max(short, round(width * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[0, :, top : top + self.image_size, left : left + self.image_size]
        return (x - self._mean) / self._std


class SyntheticImages:
    """``num_images`` standard-normal images in (B, 3, S, S) batches, reproducible from ``seed``
    whatever the batch size.

    Random pixels already look normalised to the model; they exercise the whole pipeline offline but
    say nothing about natural-image statistics.

    Args:
        num_images: total number of images.
        image_size: side S of the square model input.
        batch_size: images per batch (the last batch may be smaller).
        seed: seed of the generator the images are drawn from.
    """

    def __init__(self, num_images: int, *, image_size: int, batch_size: int = 32, seed: int = 0) -> None:
        where = "SyntheticImages"
        self.num_images = check_positive_int(where, "num_images", num_images)
        self.image_size = check_positive_int(where, "image_size", image_size)
        self.batch_size = check_positive_int(where, "batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{where}: seed expected an int, got {type(seed).__name__} {seed!r}")
        self.seed = seed

    def __len__(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.num_images, self.batch_size):
            count = min(self.batch_size, self.num_images - start)
            # One draw per image, so the images do not depend on the batch size.
            shape = (3, self.image_size, self.image_size)
            yield torch.stack([torch.randn(shape, generator=generator) for _ in range(count)])
