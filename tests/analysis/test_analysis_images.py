import pytest
import torch

from layerfuse.analysis import ImageFiles, ImageFolderBatches, SyntheticImages, find_images

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
    with pytest.raises(ValueError, match=r"ImageFolderBatches: no readable image files under"):
        ImageFolderBatches(ImageFiles(tmp_path, ()), image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
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


def write_broken(folder):
    """An empty .jpg, a truncated PNG and text named .png: what real folders hold."""
    (folder / "broken.jpg").write_bytes(b"")
    good = folder / "img0.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "notes.png").write_text("not an image")


def test_find_images_lists_unreadable_files_and_batches_skip_them(tmp_path):
    write_images(tmp_path, [(40, 30), (16, 16)], colour=(10, 200, 30))
    write_broken(tmp_path)
    found = find_images(tmp_path)
    assert found.files == (tmp_path / "img0.png", tmp_path / "img1.png")
    assert [path.name for path, _ in found.unreadable] == ["broken.jpg", "notes.png", "truncated.png"]
    assert all(reason for _, reason in found.unreadable)
    batches = ImageFolderBatches(found, image_size=8, mean=(0, 0, 0), std=(1, 1, 1), batch_size=4)
    assert batches.num_images == 2
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8)]
    unchecked = find_images(tmp_path, check=False)
    assert len(unchecked.files) == 5
    assert unchecked.unreadable == ()


def test_find_images_errors(tmp_path):
    with pytest.raises(ValueError, match=r"find_images: root .*missing' is not a folder"):
        find_images(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"find_images: no image files \(.bmp"):
        find_images(tmp_path)
