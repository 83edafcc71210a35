import pytest
import torch

from layerfuse.analysis import ImageFolderBatches, SyntheticImages

pil_image = pytest.importorskip("PIL.Image")


def write_images(folder, sizes, colour=(255, 0, 51)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        pil_image.new("RGB", size, colour).save(folder / f"img{i}.png")


def test_folder_batches_resize_crop_normalise(tmp_path):
    write_images(tmp_path / "a", [(40, 30), (16, 16)])
    write_images(tmp_path / "a" / "sub", [(10, 50)])
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    batches = ImageFolderBatches(tmp_path / "a", image_size=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0),
                                 batch_size=2, crop_pct=0.875)
    out = list(batches)
    assert len(batches) == 2
    assert [tuple(b.shape) for b in out] == [(2, 3, 24, 24), (1, 3, 24, 24)]
    expected = torch.tensor([(1.0 - 0.5) / 0.25, (0.0 - 0.5) / 0.5, (0.2 - 0.5) / 1.0])
    for batch in out:
        torch.testing.assert_close(batch.mean(dim=(2, 3)), expected.expand(batch.shape[0], 3), atol=1e-5, rtol=0)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"ImageFolderBatches: root .* is not a folder"):
        ImageFolderBatches(tmp_path / "missing", image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"ImageFolderBatches: no image files"):
        ImageFolderBatches(tmp_path / "empty", image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    write_images(tmp_path / "ok", [(8, 8)])
    with pytest.raises(ValueError, match=r"ImageFolderBatches: crop_pct expected a float in \(0, 1\], got 1.5"):
        ImageFolderBatches(tmp_path / "ok", image_size=8, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.5)
    with pytest.raises(ValueError, match=r"ImageFolderBatches: mean expected 3 values, got 2"):
        ImageFolderBatches(tmp_path / "ok", image_size=8, mean=(0, 0), std=(1, 1, 1))


def test_synthetic_images_reproducible():
    first = torch.cat(list(SyntheticImages(5, image_size=8, batch_size=2, seed=3)))
    again = torch.cat(list(SyntheticImages(5, image_size=8, batch_size=4, seed=3)))
    assert first.shape == (5, 3, 8, 8)
    assert len(SyntheticImages(5, image_size=8, batch_size=2)) == 3
    assert not torch.equal(first, torch.cat(list(SyntheticImages(5, image_size=8, batch_size=2, seed=4))))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"SyntheticImages: num_images expected a positive int, got 0"):
        SyntheticImages(0, image_size=8)
