"""Early stop, hook lifetime, references, grad / autocast / compile behaviour of LayerTap."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from layerfuse import LayerTap
from layerfuse.cli.demo_vit import DemoViT
from tap_families import FAMILIES, build, images_for


def _demo(depth: int = 4) -> DemoViT:
    return DemoViT(image_size=32, patch_size=8, width=32, depth=depth, heads=2).eval()


def _hook_counts(model: nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


class BlockCalls:
    """Counts calls of each block through forward pre-hooks (removed by close())."""

    def __init__(self, blocks: nn.Module) -> None:
        self.calls = [0] * len(blocks)
        self.handles = [b.register_forward_pre_hook(self._count(i)) for i, b in enumerate(blocks)]

    def _count(self, i: int):
        def hook(module, args):
            self.calls[i] += 1

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize(
    ("layers", "stop_early", "blocks_run"),
    [
        ([1], True, 1),
        ([0], True, 0),
        ([-2], True, 3),
        ([2, 0, 1], True, 2),
        ([-1], True, 4),
        ([1], False, 4),
    ],
)
@pytest.mark.parametrize("family_name", ["timm-clip-vit", "hf-clip", "open-clip-vit"])
def test_early_stop_skips_later_blocks(family_name, layers, stop_early, blocks_run):
    family = next(f for f in FAMILIES if f.name == family_name)
    model = build(family)
    tap = LayerTap(model, layers, stop_early=stop_early)
    counter = BlockCalls(tap.backbone.blocks)
    try:
        with torch.no_grad():
            tap(images_for(family, batch=1))
    finally:
        counter.close()
        tap.remove()
    assert counter.calls == [1] * blocks_run + [0] * (family.depth - blocks_run)


def test_early_stop_skips_the_final_norm_and_head():
    model = _demo()
    ran = []
    handle = model.blocks[-1].register_forward_hook(lambda *_: ran.append("last"))
    with torch.no_grad(), LayerTap(model, [-2]) as tap:
        tap(torch.randn(1, 3, 32, 32))
    handle.remove()
    assert ran == []


def test_hooks_inert_outside_calls_and_removed_by_remove():
    model = _demo()
    images = torch.randn(2, 3, 32, 32)
    before_hooks = _hook_counts(model)
    with torch.no_grad():
        baseline = model(images)
        tap = LayerTap(model, [0, 2, -2])
        assert _hook_counts(model) != before_hooks
        # The model keeps working while tapped: hooks do nothing outside a tap call.
        assert torch.equal(model(images), baseline)
        tap(images)
        assert torch.equal(model(images), baseline)
        tap.remove()
        tap.remove()  # idempotent
        assert tap.removed
        assert _hook_counts(model) == before_hooks
        assert torch.equal(model(images), baseline)
    with pytest.raises(RuntimeError, match=r"LayerTap.forward: this tap's hooks were removed"):
        tap(images)


def test_context_manager_removes_hooks_after_an_exception_in_the_forward():
    model = _demo()
    before_hooks = _hook_counts(model)
    baseline = model(torch.ones(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"DemoViT.forward: images expected shape \(B, C, 32, 32\)"), LayerTap(
        model, [1]
    ) as tap:
        tap(torch.randn(1, 3, 48, 48))
    assert _hook_counts(model) == before_hooks
    assert torch.equal(model(torch.ones(1, 3, 32, 32)), baseline)


def test_exception_in_the_forward_leaves_the_tap_reusable():
    model = _demo()
    tap = LayerTap(model, [1, -1])
    with pytest.raises(ValueError, match=r"DemoViT.forward: images expected shape"):
        tap(torch.randn(1, 3, 48, 48))
    assert not tap._recorder.active
    assert tap._recorder.states == {}
    good = torch.randn(1, 3, 32, 32)
    assert torch.equal(tap(good)[1], model(good)[:, 1:])
    tap.remove()


def test_no_reference_cycles_and_hooks_removed_when_the_tap_is_dropped():
    model = _demo()
    before_hooks = _hook_counts(model)
    gc.collect()
    gc.disable()  # prove plain reference counting frees everything, i.e. there is no cycle
    try:
        tap = LayerTap(model, [1, -2])
        tap_ref = weakref.ref(tap)
        with torch.no_grad():
            tap(torch.randn(1, 3, 32, 32))
        del tap
        assert tap_ref() is None
        assert _hook_counts(model) == before_hooks
        LayerTap(model, [2])(torch.randn(1, 3, 32, 32))  # an unnamed tap is dropped at once
        assert _hook_counts(model) == before_hooks
        model_ref = weakref.ref(model)
        with LayerTap(model, [1]) as tap:
            tap(torch.randn(1, 3, 32, 32))
        del tap, model
        assert model_ref() is None
    finally:
        gc.enable()


def test_gradients_flow_only_through_the_blocks_that_ran():
    model = _demo().train()
    tap = LayerTap(model, [1, -2])
    features = tap(torch.randn(2, 3, 32, 32))
    assert all(f.requires_grad for f in features)
    sum(f.square().mean() for f in features).backward()
    assert model.blocks[0].qkv.weight.grad is not None
    assert model.blocks[-1].qkv.weight.grad is None  # never ran
    with torch.no_grad():
        assert not any(f.requires_grad for f in tap(torch.randn(2, 3, 32, 32)))
    tap.remove()


class Checkpointed(nn.Module):
    """Runs ``inner`` (hooks included) under activation checkpointing, as transformers' layers do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


def test_activation_checkpointing_recompute_does_not_touch_the_tap():
    model = _demo().train()
    tap = LayerTap(model, [2], stop_early=False)
    inner = model.blocks[1]
    model.blocks[1] = Checkpointed(inner)
    calls = []
    inner.register_forward_hook(lambda *_: calls.append(tap._recorder.active))
    with set_checkpoint_early_stop(False):  # recompute whole blocks, so their forward hooks run
        (features,) = tap(torch.randn(1, 3, 32, 32))
    features.sum().backward()
    assert calls == [True, False]
    assert tap._recorder.states == {}
    assert inner.qkv.weight.grad is not None
    tap.remove()


def test_autocast_bf16_matches_the_library_under_autocast():
    family = next(f for f in FAMILIES if f.name == "timm-clip-vit")
    model = build(family)
    images = images_for(family)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), LayerTap(model, [1, -2], tokens="all") as tap:
        features = tap(images)
        for got, k in zip(features, (1, 3), strict=True):
            assert torch.equal(got, family.reference(model, images, k))


def test_bf16_model():
    model = _demo().to(torch.bfloat16)
    images = torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad(), LayerTap(model, [-1]) as tap:
        (features,) = tap(images)
        assert features.dtype == torch.bfloat16
        assert torch.equal(features, model(images)[:, 1:])


def test_torch_compile_fullgraph_matches_eager():
    model = _demo(depth=3)
    images = torch.randn(2, 3, 32, 32)
    tap = LayerTap(model, [0, 2], tokens="cls_patch")  # hooks exist before compiling
    with torch.no_grad():
        eager = tap(images)
        # aot_eager: Dynamo must trace the hooks and the early-stop exception into one graph (what
        # the tap controls) without paying for Inductor's C++ code generation on a CPU runner.
        compiled = torch.compile(tap, fullgraph=True, dynamic=False, backend="aot_eager")(images)
    assert compiled.grid == eager.grid == (4, 4)
    assert compiled.layers == (0, 2)
    for c, e in zip(compiled, eager, strict=True):
        assert torch.equal(c, e)
    tap.remove()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_tap_works_and_removes_its_own_hooks(how):
    """A copy is a working tap on a copy of the model; removing either leaves the other untouched."""
    import copy
    import io

    model = _demo()
    images = torch.randn(2, 3, 32, 32)
    tap = LayerTap(model, [1, -2], tokens="cls_patch")
    if how == "deepcopy":
        twin = copy.deepcopy(tap)
    else:
        buffer = io.BytesIO()
        torch.save(tap, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert twin.model is not model
    assert (twin.layers, twin.tokens) == (tap.layers, tap.tokens)
    with torch.no_grad():
        for a, b in zip(tap(images), twin(images), strict=True):
            assert torch.equal(a, b)
    # The copy's model holds only the copy's own hooks (the copied ones were dropped): one per layer.
    assert sum(n for counts in _hook_counts(twin.model) for n in counts) == 2
    twin.remove()
    assert sum(n for counts in _hook_counts(twin.model) for n in counts) == 0
    assert sum(n for counts in _hook_counts(model) for n in counts) == 2
    tap.remove()
    assert sum(n for counts in _hook_counts(model) for n in counts) == 0
    with pytest.raises(RuntimeError, match="cannot copy or pickle a tap whose hooks were removed"):
        copy.deepcopy(tap)


@pytest.mark.parametrize("compiled_how", ["wrapper", "in_place"])
def test_tap_of_a_model_compiled_after_an_eager_run(compiled_how):
    """Eager run, compile and run, then tap: the tap runs the model uncompiled and gets every state."""
    model = _demo()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(images)
        if compiled_how == "wrapper":
            target = torch.compile(model, backend="eager")
        else:
            model.compile(backend="eager")
            target = model
        target(images)
        expected = _demo_reference_state(model, images, 2)
        (out,) = LayerTap(target, [2], tokens="all")(images)
    assert torch.equal(out, expected)


def _demo_reference_state(model: DemoViT, images: torch.Tensor, k: int) -> torch.Tensor:
    family = next(f for f in FAMILIES if f.name == "layerfuse-demo-vit")
    return family.reference(model, images, k)
