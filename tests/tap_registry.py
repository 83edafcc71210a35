"""A registry of tiny random-weight towers from timm, transformers and open_clip, and what LayerTap does with each.

Every case is either ``exact`` (the tap equals the library's own hidden states in every token mode)
or a refusal (building the tap raises a ``ValueError`` whose message matches ``refusal``: the
architecture named and what to pass instead). A case never returns tokens that differ.

References: transformers ``hidden_states[k]`` (k = 0 included), split into prefix and patch tokens
with the case's ``num_prefix_tokens``; timm ``forward_intermediates`` (prefix tokens come back
apart); open_clip ``forward_intermediates`` (``image_intermediates_prefix`` apart). timm and
open_clip have no index-0 intermediate, so their cases check blocks 1.. only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

Reference = Callable[[nn.Module, Tensor, int], tuple[Tensor | None, Tensor]]


@dataclass(frozen=True)
class Case:
    name: str
    module: str  # library the case needs (skipped when absent)
    build: Callable[[], nn.Module]
    reference: Reference | None  # (prefix tokens or None, patch tokens) of hidden state k
    image_size: tuple[int, int] = (32, 32)
    has_class_token: bool = True
    refusal: str | None = None  # regex of the error for a refused case
    checks_index_0: bool = True
    cls_last: bool = False  # the CLS token comes after the patches (Llama 4 vision)
    kwargs: tuple[tuple[str, object], ...] = ()  # extra LayerTap arguments

    @property
    def exact(self) -> bool:
        return self.refusal is None


# --- timm ----------------------------------------------------------------------------------------

def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()

    return build


def _timm_reference(model: nn.Module, images: Tensor, k: int) -> tuple[Tensor | None, Tensor]:
    (out,) = model.forward_intermediates(
        images, indices=[k - 1], norm=False, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
    )
    # timm pairs (patches, prefix) only when the model has prefix tokens.
    return (out[1], out[0]) if isinstance(out, tuple) else (None, out)


def _timm_plain_reference(model: nn.Module, images: Tensor, k: int) -> tuple[Tensor | None, Tensor]:
    (out,) = model.forward_intermediates(images, indices=[k - 1], norm=False, output_fmt="NLC",
                                         intermediates_only=True)
    return None, out


def _timm_nhwc_reference(model: nn.Module, images: Tensor, k: int) -> tuple[Tensor | None, Tensor]:
    (out,) = model.forward_intermediates(images, indices=[k - 1], norm=False, intermediates_only=True)
    return None, out.flatten(2).transpose(1, 2)  # its maps come back NCHW


TINY = {"embed_dim": 32, "num_heads": 2, "depth": 3}
SMALL = {"img_size": 32, "patch_size": 8, **TINY}


def timm_case(name: str, model: str, *, prefix_cls: bool = True, image_size=(32, 32), **kwargs) -> Case:
    return Case(f"timm-{name}", "timm", _timm(model, **kwargs), _timm_reference, image_size, prefix_cls,
                checks_index_0=False)


def timm_refusal(name: str, model: str, refusal: str, **kwargs) -> Case:
    def build() -> nn.Module:
        # Refused from the structure alone, before any forward: no weights needed.
        with torch.device("meta"):
            return _timm(model, **kwargs)()

    return Case(f"timm-{name}", "timm", build, None, refusal=refusal)


# --- transformers --------------------------------------------------------------------------------

def _hf(model_cls: str, config_cls: str, *, sizes: bool = True, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        base = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3}
        cfg = getattr(transformers, config_cls)(**(base if sizes else {}), **config)
        return getattr(transformers, model_cls)(cfg).eval()

    return build


def _hf_reference(prefix: int, tower: Callable[[nn.Module], nn.Module] = lambda m: m) -> Reference:
    def reference(model: nn.Module, images: Tensor, k: int) -> tuple[Tensor | None, Tensor]:
        full = tower(model)(pixel_values=images, output_hidden_states=True).hidden_states[k]
        return (full[:, :prefix] if prefix else None), full[:, prefix:]

    return reference


def hf_case(name: str, model_cls: str, config_cls: str, prefix: int, *, has_cls: bool | None = None,
            image_size=(32, 32), **config) -> Case:
    config = {"image_size": 32, "patch_size": 8, **config}
    return Case(f"hf-{name}", "transformers", _hf(model_cls, config_cls, **config), _hf_reference(prefix),
                image_size, prefix > 0 if has_cls is None else has_cls)


def hf_refusal(name: str, model_cls: str, config_cls: str, refusal: str, **config) -> Case:
    def build() -> nn.Module:
        with torch.device("meta"):
            return _hf(model_cls, config_cls, **config)()

    return Case(f"hf-{name}", "transformers", build, None, refusal=refusal)


def _vlm(model_cls: str, config_cls: str, vision_config: dict, text_config: dict, **extra) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(vision_config=vision_config, text_config=text_config, **extra)
        return getattr(transformers, model_cls)(cfg).eval()

    return build


_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
         "num_key_value_heads": 2, "vocab_size": 64, "head_dim": 16}


# --- open_clip -----------------------------------------------------------------------------------

def _open_clip_reference(tower: Callable[[nn.Module], nn.Module] = lambda m: m) -> Reference:
    def reference(model: nn.Module, images: Tensor, k: int) -> tuple[Tensor | None, Tensor]:
        out = tower(model).forward_intermediates(
            images, indices=[k - 1], intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        prefix = out.get("image_intermediates_prefix")
        return (prefix[0] if prefix else None), out["image_intermediates"][0]

    return reference


def _open_clip_vit(**kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from open_clip.transformer import VisionTransformer

        args = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "heads": 2, "mlp_ratio": 2.0,
                "output_dim": 16, **kwargs}
        return VisionTransformer(**args).eval()

    return build


def _open_clip_clip(vision: dict) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import open_clip

        text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 5}
        return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()

    return build


_OC_VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16, "mlp_ratio": 2.0}

CASES: list[Case] = [
    # timm plain ViTs: exact.
    timm_case("vit", "vit_base_patch16_224", **SMALL),
    timm_case("vit-clip", "vit_base_patch16_clip_224", **SMALL),
    timm_case("vit-clip-quickgelu", "vit_base_patch16_clip_quickgelu_224", **SMALL),
    timm_case("vit-siglip", "vit_base_patch16_siglip_224", prefix_cls=False, **SMALL),
    timm_case("vit-siglip-gap", "vit_base_patch16_siglip_gap_224", prefix_cls=False, **SMALL),
    timm_case("vit-gap-reg4", "vit_base_patch16_reg4_gap_256", prefix_cls=False, **SMALL),
    timm_case("vit-dinov2", "vit_small_patch14_dinov2", img_size=28, **TINY, image_size=(28, 28)),
    timm_case("vit-dinov2-reg4", "vit_small_patch14_reg4_dinov2", img_size=28, **TINY, image_size=(28, 28)),
    timm_case("deit", "deit_tiny_patch16_224", **SMALL),
    timm_case("deit-distilled", "deit_tiny_distilled_patch16_224", **SMALL),
    timm_case("deit3", "deit3_small_patch16_224", **SMALL),
    timm_case("vit-dynamic-nonsquare", "vit_base_patch16_224", dynamic_img_size=True, image_size=(24, 40), **SMALL),
    timm_case("vit-no-embed-class", "vit_base_patch16_224", no_embed_class=True, **SMALL),
    timm_case("vit-pre-norm", "vit_base_patch16_224", pre_norm=True, **SMALL),
    timm_case("flexivit", "flexivit_small", **SMALL),
    timm_case("beit", "beit_base_patch16_224", **SMALL),
    timm_case("beitv2", "beitv2_base_patch16_224", **SMALL),
    timm_case("eva02", "eva02_tiny_patch14_224", img_size=28, **TINY, image_size=(28, 28)),
    timm_case("eva-rope-reg", "vit_base_patch16_rope_reg1_gap_256", prefix_cls=False, **SMALL),
    timm_case("vit-pe-core", "vit_pe_core_base_patch16_224", **SMALL),
    Case("timm-samvit", "timm", _timm("samvit_base_patch16", img_size=32, patch_size=8, embed_dim=32, num_heads=2,
                                      depth=3, global_attn_indexes=(2,), window_size=2, neck_chans=16),
         _timm_nhwc_reference, has_class_token=False, checks_index_0=False),
    timm_case("qwen3-vit", "qwen3_vit_88m", prefix_cls=False, img_size=32, patch_size=8, embed_dim=32,
              num_heads=2, depth=3),
    timm_case("deepseek-vit", "deepseek_vit_412m", prefix_cls=False, img_size=32, patch_size=8, embed_dim=32,
              num_heads=2, depth=3),
    Case("timm-gemma4-vit", "timm", _timm("gemma4_vit_167m", img_size=32, patch_size=8, embed_dim=32, num_heads=2,
                                          depth=3), _timm_plain_reference, has_class_token=False,
         checks_index_0=False),
    # timm layouts the tap cannot verify: refused with the architecture named.
    timm_refusal("xcit", "xcit_nano_12_p16_224", r"Xcit \(XCiT\) .*CLS token joins after the patch blocks"),
    timm_refusal("crossvit", "crossvit_tiny_240", r"CrossVit \(CrossViT\) .*two branches"),
    timm_refusal("hiera", "hiera_tiny_224", r"Hiera \(Hiera\) .*mask-unit order"),
    timm_refusal("swin", "swin_tiny_patch4_window7_224", r"SwinTransformer \(Swin\) is not a plain ViT"),
    timm_refusal("swinv2", "swinv2_tiny_window8_256", r"SwinTransformerV2 \(Swin\)"),
    timm_refusal("twins-pcpvt", "twins_pcpvt_small", r"Twins \(PVT / Twins\)"),
    timm_refusal("pvt-v2", "pvt_v2_b0", r"PyramidVisionTransformerV2 \(PVT / Twins\)"),
    timm_refusal("tnt", "tnt_s_patch16_224", r"TNT \(TNT\) .*two token streams"),
    timm_refusal("pit", "pit_ti_224", r"PoolingVisionTransformer \(PiT\)"),
    timm_refusal("pit-distilled", "pit_ti_distilled_224", r"PiT\) .*distilled variant"),
    timm_refusal("cait", "cait_xxs24_224", r"Cait \(CaiT\) .*blocks_token_only.*blocks='blocks', num_prefix_tokens=0"),
    timm_refusal("convit", "convit_tiny", r"ConVit \(ConViT\) .*local_up_to_layer"),
    timm_refusal("davit", "davit_tiny", r"DaVit \(DaViT \(Florence-2\)\)"),
    timm_refusal("mvitv2", "mvitv2_tiny", r"MultiScaleVit \(MViTv2\)"),
    timm_refusal("levit", "levit_128s", r"Levit\w* \(LeViT\)"),
    timm_refusal("volo", "volo_d1_224", r"VOLO \(VOLO\)"),
    # transformers single-image towers: exact.
    hf_case("clip", "CLIPVisionModel", "CLIPVisionConfig", 1),
    hf_case("clip-projection", "CLIPVisionModelWithProjection", "CLIPVisionConfig", 1, projection_dim=16),
    hf_case("siglip", "SiglipVisionModel", "SiglipVisionConfig", 0),
    hf_case("dinov2", "Dinov2Model", "Dinov2Config", 1),
    hf_case("dinov2-registers", "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", 4, num_register_tokens=3),
    hf_case("dinov3", "DINOv3ViTModel", "DINOv3ViTConfig", 3, num_register_tokens=2),
    hf_case("vit", "ViTModel", "ViTConfig", 1),
    hf_case("deit", "DeiTModel", "DeiTConfig", 2),
    hf_case("aimv2-head", "Aimv2VisionModel", "Aimv2VisionConfig", 0, use_head=True),
    hf_case("idefics3", "Idefics3VisionTransformer", "Idefics3VisionConfig", 0),
    hf_case("smolvlm", "SmolVLMVisionTransformer", "SmolVLMVisionConfig", 0),
    hf_case("blip", "BlipVisionModel", "BlipVisionConfig", 1),
    hf_case("blip2", "Blip2VisionModel", "Blip2VisionConfig", 1),
    hf_case("instructblip", "InstructBlipVisionModel", "InstructBlipVisionConfig", 1),
    hf_case("beit", "BeitModel", "BeitConfig", 1),
    hf_case("data2vec-vision", "Data2VecVisionModel", "Data2VecVisionConfig", 1),
    hf_case("ijepa", "IJepaModel", "IJepaConfig", 0),
    hf_case("vit-msn", "ViTMSNModel", "ViTMSNConfig", 1),
    hf_case("mlcd", "MLCDVisionModel", "MLCDVisionConfig", 1),
    hf_case("internvl", "InternVLVisionModel", "InternVLVisionConfig", 1, image_size=[32, 32], patch_size=[8, 8]),
    hf_case("git", "GitVisionModel", "GitVisionConfig", 1),
    hf_case("chinese-clip", "ChineseCLIPVisionModel", "ChineseCLIPVisionConfig", 1),
    hf_case("altclip", "AltCLIPVisionModel", "AltCLIPVisionConfig", 1),
    hf_case("metaclip2", "MetaClip2VisionModel", "MetaClip2VisionConfig", 1),
    hf_case("clipseg", "CLIPSegVisionModel", "CLIPSegVisionConfig", 1),
    hf_case("owlvit", "OwlViTVisionModel", "OwlViTVisionConfig", 1),
    hf_case("owlv2", "Owlv2VisionModel", "Owlv2VisionConfig", 1),
    hf_case("janus", "JanusVisionModel", "JanusVisionConfig", 0),
    # transformers towers the tap refuses.
    hf_refusal("vitmae", "ViTMAEModel", "ViTMAEConfig", r"ViTMAEModel \(ViTMAE\) .*masks and shuffles",
               image_size=32, patch_size=8),
    hf_refusal("hiera", "HieraModel", "HieraConfig", r"HieraModel \(Hiera\)", sizes=False),
    hf_refusal("swin", "SwinModel", "SwinConfig", r"SwinModel \(Swin\) is not a plain ViT", sizes=False),
    hf_refusal("swinv2", "Swinv2Model", "Swinv2Config", r"Swinv2Model \(Swin\)", sizes=False),
    hf_refusal("pvt-v2", "PvtV2Model", "PvtV2Config", r"PvtV2Model \(PVT / Twins\)", sizes=False),
    hf_refusal("florence2-davit", "Florence2VisionBackbone", "Florence2VisionConfig",
               r"Florence2VisionBackbone \(DaViT \(Florence-2\)\)", sizes=False),
    # open_clip: a tower, a whole CLIP (tapped on its image tower, not the text transformer).
    Case("open-clip-vit", "open_clip", _open_clip_vit(), _open_clip_reference(), checks_index_0=False),
    Case("open-clip-vit-avgpool", "open_clip", _open_clip_vit(pool_type="avg", no_ln_pre=True),
         _open_clip_reference(), checks_index_0=False),
    Case("open-clip-vit-attnpool", "open_clip", _open_clip_vit(attentional_pool=True, attn_pooler_queries=4,
                                                               attn_pooler_heads=2),
         _open_clip_reference(), checks_index_0=False),
    Case("open-clip-whole-clip", "open_clip", _open_clip_clip(_OC_VISION), _open_clip_reference(lambda m: m.visual),
         checks_index_0=False),
]


def _cls_last_reference(model: nn.Module, images: Tensor, k: int) -> tuple[Tensor | None, Tensor]:
    full = model(pixel_values=images, output_hidden_states=True).hidden_states[k]
    return full[:, -1:], full[:, :-1]


CASES.append(Case(
    "hf-llama4-vision", "transformers",
    _hf("Llama4VisionModel", "Llama4VisionConfig", sizes=False, hidden_size=32, intermediate_size=128,
        num_attention_heads=2, num_hidden_layers=3, image_size=32, patch_size=8, vision_output_dim=32,
        projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5),
    _cls_last_reference, cls_last=True,
))


# Whole multimodal models: tapped through their vision tower.
def _llava() -> nn.Module:
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
              "image_size": 32, "patch_size": 8}
    return _vlm("LlavaForConditionalGeneration", "LlavaConfig", {"model_type": "clip_vision_model", **vision},
                {"model_type": "llama", **_TEXT}, image_token_index=63)()


def _paligemma() -> nn.Module:
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
              "image_size": 32, "patch_size": 8, "projection_dim": 32}
    return _vlm("PaliGemmaForConditionalGeneration", "PaliGemmaConfig", {"model_type": "siglip_vision_model", **vision},
                {"model_type": "gemma", **_TEXT}, image_token_index=63, projection_dim=32)()


def _timm_wrapper() -> nn.Module:
    import transformers

    config = transformers.TimmWrapperConfig(architecture="vit_tiny_patch16_224", num_labels=0,
                                            model_args={"img_size": 32, "patch_size": 8, **TINY})
    return transformers.TimmWrapperModel(config).eval()


def _timm_wrapper_reference(model: nn.Module, images: Tensor, k: int) -> tuple[Tensor | None, Tensor]:
    return _timm_reference(model.timm_model, images, k)


def _vision_tower(model: nn.Module) -> nn.Module:
    return model.model.vision_tower


CASES += [
    Case("hf-timm-wrapper", "transformers", _timm_wrapper, _timm_wrapper_reference, checks_index_0=False),
    Case("hf-llava-whole-model", "transformers", _llava, _hf_reference(1, _vision_tower)),
    Case("hf-paligemma-whole-model", "transformers", _paligemma, _hf_reference(0, _vision_tower),
         has_class_token=False),
]


@functools.cache
def _built(name: str) -> nn.Module:
    case = next(c for c in CASES if c.name == name)
    pytest.importorskip(case.module)
    torch.manual_seed(0)
    return case.build()


def build(case: Case) -> nn.Module:
    """The case's model, built once per test session (models are only read by the tests)."""
    return _built(case.name)


def images_for(case: Case, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, *case.image_size, generator=torch.Generator().manual_seed(1))
