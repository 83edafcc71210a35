"""LayerTap on models named by ``blocks=``, its output helpers, and its errors for bad input."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn

from layerfuse import LayerFeatures, LayerTap
from layerfuse.cli.demo_vit import DemoBlock, DemoViT
from layerfuse.taps import find_backbone
from tap_families import FAMILIES, build, images_for


class CustomViT(nn.Module):
    """A ViT no library knows: blocks under an unusual name, two register tokens, no CLS."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.registers = nn.Parameter(torch.randn(1, 2, 16))
        self.stages = nn.ModuleList([DemoBlock(16, 2) for _ in range(3)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = rearrange(self.stem(images), "b c gh gw -> b (gh gw) c")
        x = torch.cat([self.registers.expand(x.shape[0], -1, -1), x], dim=1)
        for stage in self.stages:
            x = stage(x)
        return x


def _demo() -> DemoViT:
    return DemoViT(image_size=32, patch_size=8, width=32, depth=4, heads=2).eval()


def test_any_model_by_block_path():
    model = CustomViT().eval()
    images = torch.randn(2, 3, 12, 20)
    with torch.no_grad():
        full = model(images)
        tap = LayerTap(model, [-1], blocks="stages", num_prefix_tokens=2, tokens="all")
        (out,) = tap(images)
        (patches,) = LayerTap(model, [-1], blocks="stages", num_prefix_tokens=2)(images)
    assert tap.backbone.family == "custom"
    assert tap.grid == (3, 5)  # from the stem conv's arithmetic, not from the token count
    assert torch.equal(out, full)
    assert torch.equal(patches, full[:, 2:])


def test_stacked_and_maps():
    family = next(f for f in FAMILIES if f.name == "timm-dynamic-nonsquare")
    model = build(family)
    images = images_for(family)
    with torch.no_grad(), LayerTap(model, [2, -1]) as tap:
        features = tap(images)
        timm_maps = model.forward_intermediates(images, indices=[1, 3], norm=False, intermediates_only=True)
    assert features.stacked().shape == (2, 2, 15, 32)
    maps = features.maps()
    assert [m.shape for m in maps] == [torch.Size([2, 32, 3, 5])] * 2
    assert all(torch.equal(m, t) for m, t in zip(maps, timm_maps, strict=True))


def test_maps_errors():
    features = LayerFeatures([torch.randn(1, 5, 8)], grid=(2, 2), layers=[1], num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"LayerFeatures.maps: expected patch tokens only \(tokens='patch'\), got 1"):
        features.maps()
    with pytest.raises(ValueError, match=r"LayerFeatures.maps: the patch grid is unknown"):
        LayerFeatures([torch.randn(1, 4, 8)]).maps()
    with pytest.raises(ValueError, match=r"LayerFeatures.maps: layer 0 expected shape \(B, 6, C\) for grid \(2, 3\)"):
        LayerFeatures([torch.randn(1, 4, 8)], grid=(2, 3)).maps()
    with pytest.raises(ValueError, match=r"LayerFeatures.stacked: expected layers of one shape"):
        LayerFeatures([torch.randn(1, 4, 8), torch.randn(1, 5, 8)]).stacked()


def test_transformers_multimodal_model_is_tapped_through_its_image_tower():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 3,
                       "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )
    model = transformers.CLIPModel(config).eval()
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), LayerTap(model, [-2]) as tap:
        (out,) = tap(images)
        hidden = model.vision_model(images, output_hidden_states=True).hidden_states
    assert tap.backbone.blocks_path == "vision_model.encoder.layers"
    assert torch.equal(out, hidden[-2][:, 1:])


def test_non_square_transformers_input_through_model_kwargs():
    family = next(f for f in FAMILIES if f.name == "hf-vit")
    model = build(family)
    images = torch.randn(1, 3, 24, 40)
    with torch.no_grad(), LayerTap(model, [1]) as tap:
        (out,) = tap(images, interpolate_pos_encoding=True)
        hidden = model(images, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
    assert tap.grid == (3, 5)
    assert torch.equal(out, hidden[1][:, 1:])


@pytest.mark.parametrize(
    ("layers", "error", "message"),
    [
        ([5], ValueError, r"LayerTap: layer index 5 is out of range for a model with 4 blocks \(5 hidden states\): "
                          r"expected -5 <= index <= 4"),
        ([-6], ValueError, r"layer index -6 is out of range"),
        ([], ValueError, r"LayerTap: layers expected a non-empty sequence of ints or 'all', got \[\]"),
        ("last", ValueError, r"LayerTap: layers expected a sequence of ints or 'all', got 'last'"),
        (-2, TypeError, r"LayerTap: layers expected a sequence of ints \(e.g. \[-2\]\), got the int -2"),
        ([1.0], TypeError, r"LayerTap: layers expected ints, got float 1.0 in \[1.0\]"),
        ([True], TypeError, r"LayerTap: layers expected ints, got bool True"),
    ],
)
def test_bad_layers(layers, error, message):
    with pytest.raises(error, match=message):
        LayerTap(_demo(), layers)


def test_bad_construction_arguments():
    model = _demo()
    with pytest.raises(ValueError, match=r"LayerTap: tokens expected one of 'patch', 'cls_patch', 'all', got 'cls'"):
        LayerTap(model, [1], tokens="cls")
    with pytest.raises(TypeError, match=r"LayerTap: stop_early expected a bool, got str"):
        LayerTap(model, [1], stop_early="yes")
    with pytest.raises(TypeError, match=r"LayerTap: model expected a torch.nn.Module, got str"):
        LayerTap("vit", [1])
    with pytest.raises(ValueError, match=r"LayerTap: cannot find the transformer blocks of Linear; looked for blocks, "
                                         r"trunk.blocks, .*Pass blocks='dotted.path'"):
        LayerTap(nn.Linear(2, 2), [1])
    with pytest.raises(ValueError, match=r"LayerTap: blocks='encoder' expected the path of a non-empty nn.ModuleList "
                                         r"or nn.Sequential inside DemoViT, got no such submodule"):
        LayerTap(model, [1], blocks="encoder")
    with pytest.raises(ValueError, match=r"blocks='norm_pre' expected .* got LayerNorm with no children"):
        LayerTap(model, [1], blocks="norm_pre")
    with pytest.raises(TypeError, match=r"LayerTap: blocks expected a dotted path string, got int"):
        LayerTap(model, [1], blocks=3)
    with pytest.raises(ValueError, match=r"LayerTap: num_prefix_tokens expected an int >= 0, got -1"):
        LayerTap(model, [1], num_prefix_tokens=-1)
    with pytest.raises(TypeError, match=r"LayerTap: num_prefix_tokens expected an int >= 0, got float 1.0"):
        LayerTap(model, [1], num_prefix_tokens=1.0)
    with pytest.raises(ValueError, match=r"LayerTap: tokens='cls_patch' needs a CLS token, but CustomViT has none"):
        LayerTap(CustomViT(), [1], blocks="stages", num_prefix_tokens=2, tokens="cls_patch")
    with pytest.raises(ValueError, match=r"LayerTap: tokens='cls_patch' needs a CLS token, but CustomViT has none"):
        LayerTap(CustomViT(), [1], blocks="stages", tokens="cls_patch")


def test_bad_images():
    tap = LayerTap(_demo(), [1])
    with pytest.raises(TypeError, match=r"LayerTap.forward: images expected a torch.Tensor \(B, C, H, W\) "
                                        r"\(positionally or as pixel_values=\), got list"):
        tap([torch.randn(3, 32, 32)])
    with pytest.raises(TypeError, match=r"images expected a torch.Tensor .* got NoneType"):
        tap()
    with pytest.raises(TypeError, match=r"LayerTap.forward: expected the images once, positionally or as "
                                        r"pixel_values=, got both"):
        tap(torch.randn(1, 3, 32, 32), pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"LayerTap.forward: images expected a 4-d tensor \(B, C, H, W\), "
                                         r"got shape \(3, 32, 32\)"):
        tap(torch.randn(3, 32, 32))


def test_wrong_prefix_count_is_an_error_not_a_silent_shift():
    tap = LayerTap(_demo(), [1], num_prefix_tokens=3)
    with pytest.raises(ValueError, match=r"LayerTap.forward: DemoViT \(blocks\) expected 3 prefix tokens \+ 4x4 patches = 19 tokens, "
                                         r"got 17; pass num_prefix_tokens="):
        tap(torch.randn(1, 3, 32, 32))


def test_find_backbone_describes_the_demo_tower():
    backbone = find_backbone(_demo())
    assert (backbone.family, backbone.blocks_path, backbone.depth) == ("layerfuse", "blocks", 4)
    assert (backbone.num_prefix_tokens, backbone.has_class_token) == (1, True)
    assert backbone.grid_for((32, 48)) == (4, 6)


@pytest.mark.parametrize("family_name", ["hf-clip", "timm-clip-vit", "open-clip-vit"])
def test_hugging_face_calling_style_pixel_values(family_name):
    """tap(pixel_values=...) equals tap(images) for every library (the tensor goes in positionally)."""
    family = next(f for f in FAMILIES if f.name == family_name)
    model = build(family)
    images = images_for(family)
    with torch.no_grad(), LayerTap(model, [1, -1]) as tap:
        positional = tap(images)
        keyword = tap(pixel_values=images)
    assert keyword.grid == positional.grid == family.grid
    assert all(torch.equal(a, b) for a, b in zip(keyword, positional, strict=True))


def test_unknown_grid_refuses_to_slice_prefix_tokens():
    """Without a patch embedding whose grid is known, 'patch' would guess which tokens are patches."""

    class NoStem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(48, 16)
            self.blocks = nn.ModuleList([DemoBlock(16, 2) for _ in range(2)])

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = self.embed(rearrange(images, "b c (h p) (w q) -> b (h w) (c p q)", p=4, q=4))
            for block in self.blocks:
                x = block(x)
            return x

    model = NoStem().eval()
    images = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"cannot verify the token layout of NoStem: its patch grid is unknown .*"
                                         r"pass tokens='all'"):
        LayerTap(model, [1], num_prefix_tokens=0)(images)
    with torch.no_grad():
        (out,) = LayerTap(model, [2], tokens="all")(images)
        assert torch.equal(out, model(images))


def test_refusals_hold_through_blocks_and_lift_only_where_the_user_states_the_layout():
    """blocks= cannot smuggle a refused layout in; where the refusal names blocks= + num_prefix_tokens=, those work."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        pit = timm.create_model("pit_ti_distilled_224", pretrained=False)
    with pytest.raises(ValueError, match=r"PoolingVisionTransformer \(PiT\) is not a plain ViT"):
        LayerTap(pit, [1], blocks="transformers.0.blocks", num_prefix_tokens=2)
    xcit = timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=32, depth=2, num_classes=0).eval()
    with pytest.raises(ValueError, match=r"Xcit \(XCiT\) .* instead: blocks='blocks', num_prefix_tokens=0, tokens='all'"):
        LayerTap(xcit, [1])
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"cannot verify the token layout of Xcit: its patch grid is unknown"):
        LayerTap(xcit, [1], blocks="blocks", num_prefix_tokens=0)(images)
    with torch.no_grad():
        (tokens,) = LayerTap(xcit, [2], blocks="blocks", num_prefix_tokens=0, tokens="all")(images)
        (maps,) = xcit.forward_intermediates(images, indices=[1], intermediates_only=True)
    assert torch.equal(tokens, maps.flatten(2).transpose(1, 2))


def test_hf_hiera_refused_through_blocks():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.HieraModel(transformers.HieraConfig())
    with pytest.raises(ValueError, match=r"HieraModel \(Hiera\) is not a plain ViT .*mask-unit order"):
        LayerTap(model, [1], blocks="encoder.stages.0.layers", num_prefix_tokens=0)
