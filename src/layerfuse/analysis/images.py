"""Image batches for analysis runs: a folder of image files, or random images."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .._checks import check_bool, check_float, check_float_list, check_positive_int
from .._optional import require

# b batch, c channels, h/w pixel rows/columns

__all__ = ["IMAGE_SUFFIXES", "ImageFiles", "ImageFolderBatches", "SyntheticImages", "find_images"]

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageFiles:
    """The image files of a folder, split into those that decode and those that do not.

    Attributes:
        root: the folder searched.
        files: readable image files, in sorted path order.
        unreadable: ``(path, reason)`` for every file with an image suffix that failed to decode
            (empty, truncated, not an image).
    """

    root: Path
    files: tuple[Path, ...]
    unreadable: tuple[tuple[Path, str], ...] = ()


def find_images(root: str | Path, *, check: bool = True) -> ImageFiles:
    """Every file under ``root`` (recursively) whose suffix is in ``IMAGE_SUFFIXES``, each decoded
    once so that a broken file is found before any model is built or any batch is computed.

    Decoding reads every pixel (truncated JPEGs only fail there), so the check costs about one extra
    read of the folder; ``check=False`` skips it and lists every file as readable.

    Args:
        root: folder to search.
        check: decode each file and list the ones that fail in ``unreadable``. Default: ``True``

    Returns:
        An [`ImageFiles`][layerfuse.analysis.ImageFiles].

    Raises:
        ValueError: ``root`` is not a folder or holds no file with an image suffix.
        ImportError: Pillow is missing (it comes with the ``analysis`` extra) and ``check`` is set.
    """
    where = "find_images"
    check_bool(where, "check", check)
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{where}: root {str(root)!r} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"{where}: no image files ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}")
    if not check:
        return ImageFiles(root, tuple(paths))
    pil_image = require("PIL.Image", extra="analysis", purpose="reading image files")
    readable, unreadable = [], []
    for path in paths:
        try:
            with pil_image.open(path) as img:
                img.load()
        # Pillow signals a broken file with many types (OSError, SyntaxError from some plugins,
        # DecompressionBombError, ValueError); every one of them means "cannot be used".
        except Exception as err:
            unreadable.append((path, f"{type(err).__name__}: {err}"))
        else:
            readable.append(path)
    return ImageFiles(root, tuple(readable), tuple(unreadable))


class ImageFolderBatches:
    """Normalised (B, 3, S, S) batches of every image file under a folder, in sorted path order.

    Each image is converted to RGB, resized (bicubic, antialiased) so its shorter side is
    ``round(image_size / crop_pct)``, centre-cropped to ``image_size`` × ``image_size``, scaled to
    [0, 1] and normalised with ``mean`` / ``std``: timm's evaluation transform, and the CLIP image
    processor's for ``crop_pct=1``. Files are read lazily, one batch at a time. Needs Pillow (installed
    with the ``analysis`` extra, through matplotlib).

    A folder is searched without decoding its files; pass the result of
    [`find_images`][layerfuse.analysis.find_images] instead to leave out unreadable files up front.

    Args:
        root: folder searched recursively for files ending in one of ``IMAGE_SUFFIXES``, or an
            [`ImageFiles`][layerfuse.analysis.ImageFiles] whose readable ``files`` are used.
        image_size: side S of the square model input.
        mean: per-channel mean of the model's normalisation.
        std: per-channel standard deviation of the model's normalisation.
        batch_size: images per batch (the last batch may be smaller).
        crop_pct: fraction of the resized image kept by the centre crop, in (0, 1].
    """

    def __init__(
        self,
        root: str | Path | ImageFiles,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int = 32,
        crop_pct: float = 1.0,
    ) -> None:
        where = "ImageFolderBatches"
        if not isinstance(root, ImageFiles):
            if not Path(root).is_dir():
                raise ValueError(f"{where}: root {str(root)!r} is not a folder")
            try:
                root = find_images(root, check=False)
            except ValueError as err:
                raise ValueError(f"{where}: {str(err).removeprefix('find_images: ')}") from None
        if not root.files:
            raise ValueError(f"{where}: no readable image files under {str(root.root)!r}")
        self.root = root.root
        self.files = list(root.files)
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

    @property
    def num_images(self) -> int:
        """How many images the batches hold in all."""
        return len(self.files)

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
