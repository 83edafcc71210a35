import json
import sys
from typing import ClassVar

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from layerfuse import LayerFeatures, LayerTap
from layerfuse.analysis import LayerSimilarity, TokenCosine, iter_image_batches, layer_similarity

timm = pytest.importorskip("timm")


def toy_extractor(images):
    """Three deterministic 'layers' of (B, 4, 6) features computed from the pixels."""
    tokens = images.flatten(1)[:, :24].reshape(-1, 4, 6)
    return LayerFeatures([tokens, tokens.tanh(), tokens.square()], layers=(0, 5, -1))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32)


def test_callable_matches_accumulator_and_ignores_batching():
    images = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    reference = TokenCosine()
    reference.update(toy_extractor(images))
    for batch_size in (1, 3, 7):
        result = layer_similarity(toy_extractor, images, batch_size=batch_size, progress=False)
        torch.testing.assert_close(result.matrix, reference.compute(), rtol=0, atol=1e-12)
    assert (result.layers, result.num_images, result.metric, result.tokens) == ((0, 5, -1), 7, "cosine", None)


def test_dataloader_tuples_and_dicts():
    images = torch.randn(6, 3, 4, 4)
    direct = layer_similarity(toy_extractor, images, metric="cka", progress=False)
    loader = DataLoader(TensorDataset(images, torch.arange(6)), batch_size=4)
    from_loader = layer_similarity(toy_extractor, loader, metric="cka", progress=True)
    from_dicts = layer_similarity(toy_extractor, [{"pixel_values": images[:2]}, {"pixel_values": images[2:]}],
                                  metric="cka", progress=False)
    torch.testing.assert_close(from_loader.matrix, direct.matrix, rtol=0, atol=1e-12)
    torch.testing.assert_close(from_dicts.matrix, direct.matrix, rtol=0, atol=1e-12)
    assert from_loader.num_images == 6


def test_model_runs_in_eval_mode_and_is_left_as_found(vit):
    vit.train()
    seen = []
    probe = vit.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        result = layer_similarity(vit, torch.randn(3, 3, 32, 32), batch_size=2, progress=False)
    finally:
        probe.remove()
    assert seen == [False, False]
    assert vit.training
    assert all(m.training for m in vit.modules())
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in vit.blocks)
    assert result.layers == tuple(range(7))
    assert result.tokens == "patch"
    assert result.num_images == 3
    assert torch.isfinite(result.matrix).all()


def test_model_layers_and_tap(vit):
    images = torch.randn(2, 3, 32, 32)
    picked = layer_similarity(vit, images, layers=[-1, 0, 3], tokens="all", metric="pooled_cosine", progress=False)
    assert picked.layers == (6, 0, 3)
    assert picked.tokens == "all"
    full = layer_similarity(vit, images, tokens="all", metric="pooled_cosine", progress=False)
    torch.testing.assert_close(picked.matrix, full.subset([6, 0, 3]).matrix, rtol=0, atol=1e-12)
    with LayerTap(vit, [2, 4]) as tap:
        tapped = layer_similarity(tap, images, progress=False)
        assert tapped.layers == (2, 4)
        with pytest.raises(ValueError, match=r"layer_similarity: layers and tokens are set on the LayerTap"):
            layer_similarity(tap, images, layers=[1], progress=False)


def test_result_subset_and_dict():
    result = LayerSimilarity(torch.eye(3, dtype=torch.float64), (0, 4, 8), "cka", 10, "patch")
    sub = result.subset([8, 0])
    assert sub.layers == (8, 0)
    assert sub.to_dict() == {"model": None, "metric": "cka", "tokens": "patch", "num_images": 10,
                             "layers": [8, 0], "matrix": [[1.0, 0.0], [0.0, 1.0]]}
    with pytest.raises(ValueError, match=r"LayerSimilarity.subset: layers \[5\] are not among \(0, 4, 8\)"):
        result.subset([5])
    with pytest.raises(ValueError, match=r"LayerSimilarity: matrix expected shape \(2, 2\)"):
        LayerSimilarity(torch.eye(3), (0, 1), "cka", 1)


def test_errors(vit):
    images = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"layer_similarity: metric expected one of 'cosine', 'pooled_cosine', 'cka', got 'cca'"):
        layer_similarity(toy_extractor, images, metric="cca", progress=False)
    with pytest.raises(ValueError, match=r"layer_similarity: layers and tokens apply only when a model is given"):
        layer_similarity(toy_extractor, images, tokens="all", progress=False)
    with pytest.raises(TypeError, match=r"layer_similarity: tap_or_model expected a LayerTap, an nn.Module or a callable"):
        layer_similarity("vit", images, progress=False)
    with pytest.raises(TypeError, match=r"layer_similarity: images expected a \(B, 3, H, W\) tensor or an iterable"):
        layer_similarity(toy_extractor, 3, progress=False)
    with pytest.raises(ValueError, match=r"layer_similarity: images expected a floating-point image batch"):
        layer_similarity(toy_extractor, torch.randn(3, 4, 4), progress=False)
    with pytest.raises(TypeError, match=r"layer_similarity: batch 1 expected a tensor, an \(images, labels\) tuple"):
        layer_similarity(toy_extractor, [images, "x"], progress=False)
    with pytest.raises(ValueError, match=r"batch 0 is a dict without 'pixel_values'; got keys \['image'\]"):
        layer_similarity(toy_extractor, [{"image": images}], progress=False)
    with pytest.raises(ValueError, match=r"layer_similarity: images yielded no batches"):
        layer_similarity(toy_extractor, [], progress=False)
    with pytest.raises(ValueError, match=r"layer_similarity: batch_size expected a positive int, got 0"):
        layer_similarity(toy_extractor, images, batch_size=0, progress=False)
    with pytest.raises(ValueError, match=r"LayerTap: layer index 9 is out of range"):
        layer_similarity(vit, images, layers=[9], progress=False)


def test_iter_image_batches_splits_tensor():
    sizes = [b.shape[0] for b in iter_image_batches(torch.randn(5, 3, 2, 2), batch_size=2)]
    assert sizes == [2, 2, 1]


def test_json_round_trip_without_recomputing(vit, tmp_path):
    result = layer_similarity(vit, torch.randn(3, 3, 32, 32), metric="cka", progress=False)
    assert result.model == "test_vit"
    path = tmp_path / "sim.json"
    path.write_text(json.dumps({**result.to_dict(), "groups": {"bands": [[1, 2]]}}))  # extra keys ignored
    again = LayerSimilarity.from_json(path)
    torch.testing.assert_close(again.matrix, result.matrix, rtol=0, atol=0)
    assert (again.layers, again.metric, again.num_images, again.tokens, again.model) == (
        result.layers, "cka", 3, "patch", "test_vit")
    old = {k: v for k, v in result.to_dict().items() if k not in ("model", "tokens")}
    assert LayerSimilarity.from_dict(old).model is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"layers": [0], "metric": "cka", "num_images": 1}, r"missing key\(s\) \['matrix'\]"),
        ({"matrix": [[1.0]], "layers": ["a"], "metric": "cka", "num_images": 1}, r"layers expected a list of ints"),
        ({"matrix": [[1.0]], "layers": [0], "metric": "cca", "num_images": 1}, r"metric expected one of"),
        ({"matrix": [[1.0]], "layers": [0], "metric": "cka", "num_images": 0}, r"num_images expected a positive int"),
        ({"matrix": [[1.0, 2.0]], "layers": [0], "metric": "cka", "num_images": 1},
         r"matrix expected shape \(1, 1\) for layers \[0\], got \(1, 2\)"),
        ({"matrix": [[1.0], [2.0, 3.0]], "layers": [0, 1], "metric": "cka", "num_images": 1},
         r"matrix expected L lists of L numbers"),
        ([1, 2], r"expected a JSON object, got list"),
    ],
)
def test_from_dict_errors(data, message):
    with pytest.raises(ValueError, match=r"LayerSimilarity.from_dict \(f.json\): " + message):
        LayerSimilarity.from_dict(data, source="f.json")


def test_from_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"LayerSimilarity.from_json: .*missing.json' is not a file"):
        LayerSimilarity.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"LayerSimilarity.from_json: .*bad.json' is not valid JSON"):
        LayerSimilarity.from_json(tmp_path / "bad.json")


class CountingBar:
    """Stands in for tqdm.tqdm and records what the bar is told."""

    instances: ClassVar[list] = []

    def __init__(self, total=None, desc=None, unit=None):
        self.total, self.unit, self.updates = total, unit, []
        CountingBar.instances.append(self)

    def update(self, n):
        self.updates.append(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    ("images", "total"),
    [
        (torch.randn(5, 3, 4, 4), 5),
        (DataLoader(TensorDataset(torch.randn(5, 3, 4, 4)), batch_size=2), 5),
        ((torch.randn(n, 3, 4, 4) for n in (2, 3)), None),  # a generator does not know its length
    ],
)
def test_progress_counts_images(monkeypatch, images, total):
    tqdm = pytest.importorskip("tqdm")
    CountingBar.instances.clear()
    monkeypatch.setattr(tqdm, "tqdm", CountingBar)
    layer_similarity(toy_extractor, images, batch_size=2)
    (bar,) = CountingBar.instances
    assert (bar.total, bar.unit, sum(bar.updates)) == (total, "image", 5)


def test_defaults_work_without_tqdm(monkeypatch):
    # A core install has no tqdm: the default shows no bar instead of failing; asking for one fails.
    monkeypatch.setitem(sys.modules, "tqdm", None)
    images = torch.randn(4, 3, 4, 4)
    assert layer_similarity(toy_extractor, images).num_images == 4
    with pytest.raises(ImportError, match=r"layer_similarity\(progress=True\) needs the optional dependency 'tqdm'"):
        layer_similarity(toy_extractor, images, progress=True)
