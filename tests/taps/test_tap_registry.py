"""The registry contract: every tiny tower is exact against its library in every token mode, or refused."""

from __future__ import annotations

import pytest
import torch

from layerfuse import LayerTap
from tap_registry import CASES, build, images_for

TOKEN_MODES = ("patch", "cls_patch", "all")


def test_registry_size_and_libraries():
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.module for c in CASES} == {"timm", "transformers", "open_clip"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tap_is_exact_or_refuses(case):
    model = build(case)
    if not case.exact:
        with pytest.raises(ValueError, match=case.refusal) as error:
            LayerTap(model, [1], **dict(case.kwargs))
        assert "instead:" in str(error.value)
        return
    images = images_for(case)
    depth = LayerTap(model, [1], **dict(case.kwargs)).backbone.depth
    indices = ((0,) if case.checks_index_0 else ()) + (1, depth - 1, -1)
    absolute = [k % (depth + 1) for k in indices]
    with torch.no_grad():
        references = {k: case.reference(model, images, k) for k in set(absolute)}
        for tokens in TOKEN_MODES:
            if tokens == "cls_patch" and not case.has_class_token:
                with pytest.raises(ValueError, match="tokens='cls_patch' needs a CLS token"):
                    LayerTap(model, indices, tokens=tokens, **dict(case.kwargs))
                continue
            with LayerTap(model, indices, tokens=tokens, **dict(case.kwargs)) as tap:
                features = tap(images)
            for got, k in zip(features, absolute, strict=True):
                prefix, patches = references[k]
                expected = {
                    "patch": patches,
                    "cls_patch": torch.cat([prefix[:, :1], patches], dim=1) if prefix is not None else None,
                    "all": patches if prefix is None else torch.cat(
                        [patches, prefix] if case.cls_last else [prefix, patches], dim=1
                    ),
                }[tokens]
                assert got.shape == expected.shape, f"{case.name} {tokens} layer {k}: {got.shape} vs {expected.shape}"
                assert torch.equal(got, expected), f"{case.name} {tokens} layer {k} differs"
            grid = features.grid
            assert grid is not None
            assert grid[0] * grid[1] == references[absolute[0]][1].shape[1]
