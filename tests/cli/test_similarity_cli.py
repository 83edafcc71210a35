import json

import pytest
import torch

from layerfuse.cli.main import main

image = pytest.importorskip("matplotlib.image")
pytest.importorskip("timm")

TINY = ["--model", "timm:test_vit", "--image-size", "32", "--batch-size", "2", "--no-progress"]


def run_cli(*argv):
    return main(["similarity", *TINY, *argv])


def test_synthetic_writes_png_and_json(tmp_path, capsys):
    png, js = tmp_path / "sim.png", tmp_path / "out" / "sim.json"
    assert run_cli("--synthetic", "3", "--metric", "cka", "--out", str(png), "--json", str(js)) == 0
    printed = capsys.readouterr().out
    assert "3 synthetic images at 32x32, metric cka" in printed
    assert "shallow  layers 1" in printed
    assert "deep" in printed
    assert f"wrote {js}" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.imread(png).shape[0] > 100
    payload = json.loads(js.read_text())
    assert payload["layers"] == list(range(7))
    assert payload["grouped_layers"] == list(range(1, 7))
    assert payload["num_images"] == 3
    assert payload["metric"] == "cka"
    assert payload["model"] == "timm:test_vit"
    assert payload["weights"] == "random"
    assert payload["skipped_files"] == []
    matrix = torch.tensor(payload["matrix"])
    assert matrix.shape == (7, 7)
    assert torch.isfinite(matrix).all()
    bands = payload["groups"]["bands"]
    assert len(bands) == 3
    assert [layer for band in bands for layer in band] == list(range(1, 7))


def test_image_folder_layers_and_checkpoint(tmp_path, capsys):
    pil_image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(40, 30), (32, 32), (20, 50)]):
        pil_image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"{i}.png")
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    safetensors.save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    js = tmp_path / "sim.json"
    assert run_cli("--images", str(folder), "--layers=-1,0,2,4", "--k", "2", "--include-embedding",
                   "--checkpoint", str(tmp_path / "w.safetensors"), "--json", str(js)) == 0
    payload = json.loads(js.read_text())
    assert payload["layers"] == [6, 0, 2, 4]
    assert payload["grouped_layers"] == [6, 0, 2, 4]
    assert payload["num_images"] == 3
    assert payload["weights"].endswith("w.safetensors")
    assert "3 images from" in capsys.readouterr().out


def test_hf_folder_with_random_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    config.save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}))
    js = tmp_path / "sim.json"
    assert main(["similarity", "--model", f"hf:{tmp_path / 'clip'}", "--synthetic", "2", "--no-progress",
                 "--tokens", "cls_patch", "--json", str(js)]) == 0
    payload = json.loads(js.read_text())
    assert payload["layers"] == [0, 1, 2, 3]
    assert payload["tokens"] == "cls_patch"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet50", "--synthetic", "2"], r"model expected 'timm:<name>' or 'hf:<folder>', got 'resnet50'"),
        (["--model", "timm:no_such_vit", "--synthetic", "2"], r"timm has no model named 'no_such_vit'"),
        (["--model", "hf:/nonexistent/dir", "--synthetic", "2"], r"hf:/nonexistent/dir expected a local folder"),
        ([*TINY, "--synthetic", "2", "--layers", "1,x"], r"--layers expected 'all' or comma-separated integers"),
        ([*TINY, "--synthetic", "0"], r"--synthetic expected a positive integer, got 0"),
        ([*TINY, "--synthetic", "2", "--k", "9"],
         r"--k 9 bands need at least 9 banded layers, but timm:test_vit give\(s\) 6: \[1, 2, 3, 4, 5, 6\]"),
        ([*TINY, "--synthetic", "2", "--layers=0,3,5"],
         r"--k 3 bands need at least 3 banded layers, but --layers give\(s\) 2: \[3, 5\] \(hidden state 0 is"),
        (["--synthetic", "2"], r"--model is required to compute a similarity \(or re-plot with --from-json FILE\)"),
        ([*TINY, "--synthetic", "2", "--checkpoint", "missing.safetensors"], r"checkpoint file missing.safetensors does not exist"),
        ([*TINY, "--images", "/nonexistent/images"], r"find_images: root '/nonexistent/images' is not a folder"),
    ],
)
def test_errors_exit_with_message(argv, message):
    with pytest.raises(SystemExit, match=r"layerfuse similarity: error: .*" + message):
        main(["similarity", *argv])


def test_needs_exactly_one_image_source(capsys):
    with pytest.raises(SystemExit):
        main(["similarity", *TINY])
    assert "one of the arguments --images --synthetic --from-json is required" in capsys.readouterr().err


def write_folder(folder, pil_image, broken=True):
    folder.mkdir()
    for i, size in enumerate([(40, 30), (32, 32), (20, 50)]):
        pil_image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"{i}.png")
    if broken:
        (folder / "broken.jpg").write_bytes(b"")


def test_unreadable_image_is_skipped_with_a_listed_warning(tmp_path, capsys):
    pil_image = pytest.importorskip("PIL.Image")
    write_folder(tmp_path / "images", pil_image)
    js = tmp_path / "sim.json"
    assert run_cli("--images", str(tmp_path / "images"), "--json", str(js)) == 0
    captured = capsys.readouterr()
    assert "warning: skipping 1 of 4 image files that cannot be read:" in captured.err
    assert f"{tmp_path / 'images' / 'broken.jpg'}: UnidentifiedImageError" in captured.err
    assert "3 images from" in captured.out
    payload = json.loads(js.read_text())
    assert payload["num_images"] == 3
    assert payload["skipped_files"] == [str(tmp_path / "images" / "broken.jpg")]


def test_unreadable_image_fails_before_the_model_loads(tmp_path, monkeypatch):
    pil_image = pytest.importorskip("PIL.Image")
    write_folder(tmp_path / "images", pil_image)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the image files were checked")

    monkeypatch.setattr("layerfuse.cli.similarity.load_model", no_model)
    with pytest.raises(SystemExit, match=r"1 of 4 image files cannot be read \(--fail-on-unreadable is set\):\n"
                                         r"  .*broken.jpg: UnidentifiedImageError"):
        run_cli("--images", str(tmp_path / "images"), "--fail-on-unreadable")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"1 of 1 image files cannot be read \(no readable image is left\)"):
        run_cli("--images", str(tmp_path / "bad"))


def test_too_few_layers_for_k_fails_before_computing(monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("similarity computed before the band count was checked")

    monkeypatch.setattr("layerfuse.cli.similarity.layer_similarity", no_compute)
    with pytest.raises(SystemExit, match=r"--k 7 bands need at least 7 banded layers"):
        run_cli("--synthetic", "2", "--k", "7")
    with pytest.raises(SystemExit, match=r"--k 2 bands need at least 2 banded layers, but --layers give\(s\) 1"):
        run_cli("--synthetic", "2", "--k", "2", "--layers", "0,4")


def test_from_json_replots_without_a_model(tmp_path, monkeypatch, capsys):
    js, png = tmp_path / "sim.json", tmp_path / "again.png"
    assert run_cli("--synthetic", "3", "--json", str(js)) == 0
    saved = json.loads(js.read_text())
    capsys.readouterr()

    def no_model(*args, **kwargs):
        raise AssertionError("--from-json loaded a model")

    monkeypatch.setattr("layerfuse.cli.similarity.load_model", no_model)
    monkeypatch.setattr("layerfuse.cli.similarity.layer_similarity", no_model)
    again = tmp_path / "again.json"
    assert main(["similarity", "--from-json", str(js), "--k", "2", "--layers", "2,3,4,5",
                 "--out", str(png), "--json", str(again), "--title", "re-plot"]) == 0
    out = capsys.readouterr().out
    assert f"re-plotting {js} (no model loaded): timm:test_vit, 3 images, metric cosine, layers [2, 3, 4, 5]" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    replotted = json.loads(again.read_text())
    assert replotted["layers"] == [2, 3, 4, 5]
    assert len(replotted["groups"]["bands"]) == 2
    assert replotted["weights"] == saved["weights"]
    index = [saved["layers"].index(k) for k in (2, 3, 4, 5)]
    assert replotted["matrix"] == [[saved["matrix"][i][j] for j in index] for i in index]


@pytest.mark.parametrize("extra", [["--model", "timm:test_vit"], ["--metric", "cka"], ["--batch-size", "4"]])
def test_from_json_rejects_compute_options(tmp_path, extra):
    js = tmp_path / "sim.json"
    js.write_text(json.dumps({"matrix": [[1.0]], "layers": [1], "metric": "cosine", "num_images": 1}))
    with pytest.raises(SystemExit, match=r"--from-json re-plots a saved result without a model; " + extra[0]):
        main(["similarity", "--from-json", str(js), *extra])
