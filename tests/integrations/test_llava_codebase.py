"""The LLaVA drop-in inside the real LLaVA codebase (``pip install llava-torch --no-deps``).

A tiny ``LlavaLlamaForCausalLM`` (2-layer Llama, 6-block CLIP tower saved to a temporary folder, no
downloads) is built through LLaVA's own ``initialize_vision_modules`` with ``patch()`` installed,
trained for a few steps with LLaVA's optimizer (``LLaVATrainer.create_optimizer``, ``mm_projector_lr``)
and saved / reloaded through LLaVA's stage-1 path. Skips, with the reason, when ``llava`` is absent.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fixture_utils import assert_fixture_close, load_fixture

pytest.importorskip(
    "llava.model",
    reason="the LLaVA codebase is not installed (pip install llava-torch --no-deps); LLaVA drop-in tests skip",
)
transformers = pytest.importorskip("transformers")

from llava.model import LlavaLlamaForCausalLM  # noqa: E402
from llava.model.language_model.llava_llama import LlavaConfig  # noqa: E402

from layerfuse import LayerFeatures, LayerTap, MMFuser, Projector, from_official  # noqa: E402
from layerfuse.fusers.pipeline import FusionProjector  # noqa: E402
from layerfuse.integrations import llava as lf_llava  # noqa: E402
from layerfuse.presets import preset_plan  # noqa: E402

IMAGE_TOKEN_INDEX = -200
DEPTH, WIDTH, LLM_WIDTH, IMAGE, PATCH = 6, 32, 48, 32, 8
TYPES = ["mmfuser", "dense_connector_dci", "lin_ed_3_18_23"]


@contextmanager
def patched():
    """``patch()`` for the duration of a block, then LLaVA's own builders back."""
    modules = [
        importlib.import_module(name)
        for name in (
            "llava.model.multimodal_projector.builder",
            "llava.model.multimodal_encoder.builder",
            "llava.model.llava_arch",
        )
    ]
    saved = [(m, dict(vars(m))) for m in modules]
    lf_llava.patch()
    try:
        yield
    finally:
        for module, namespace in saved:
            for name in ("build_vision_projector", "build_vision_tower"):
                if name in namespace:
                    setattr(module, name, namespace[name])


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    """A tiny CLIP tower and image processor on disk: LLaVA's stock tower loads them by path."""
    path = tmp_path_factory.mktemp("clip_tower")
    torch.manual_seed(1)
    config = transformers.CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=4,
        image_size=IMAGE, patch_size=PATCH,
    )
    transformers.CLIPVisionModel(config).save_pretrained(path)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llava_train():
    """``llava.train.train`` (LLaVA's training module). As released it imports
    ``transformers.trainer.ALL_LAYERNORM_LAYERS``, which transformers 5 removed; the value it had
    (``[nn.LayerNorm]``) is put back for the import. Saving the stage-1 adapter needs ``deepspeed``."""
    import transformers.trainer as trainer_module

    pytest.importorskip("deepspeed", reason="LLaVA's stage-1 save (maybe_zero_3) imports deepspeed")
    restore = not hasattr(trainer_module, "ALL_LAYERNORM_LAYERS")
    if restore:
        trainer_module.ALL_LAYERNORM_LAYERS = [nn.LayerNorm]
    yield importlib.import_module("llava.train.train")
    if restore:
        del trainer_module.ALL_LAYERNORM_LAYERS


def llava_config() -> LlavaConfig:
    return LlavaConfig(
        vocab_size=64, hidden_size=LLM_WIDTH, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128,
    )


def model_args(tower_dir, projector_type: str, adapter=None) -> SimpleNamespace:
    """The fields of LLaVA's ``ModelArguments`` that ``initialize_vision_modules`` reads."""
    return SimpleNamespace(
        vision_tower=str(tower_dir), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None if adapter is None else str(adapter), mm_patch_merge_type="flat",
        mm_projector_type=projector_type,
    )


def build(tower_dir, projector_type: str, *, adapter=None, seed: int = 0) -> LlavaLlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(llava_config())
    model.get_model().initialize_vision_modules(model_args(tower_dir, projector_type, adapter))
    return model


def batch(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, 8), generator=g)
    ids[:, 2] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :3] = -100
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=g).to(dtype)
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "images": images}


def stage1_train(model, llava_train, tmp_path, steps: int = 3) -> None:
    """LLaVA's stage 1 (``--tune_mm_mlp_adapter``): only ``mm_projector`` trains, with LLaVA's own
    optimizer grouping for ``--mm_projector_lr``."""
    model.requires_grad_(False)
    for p in model.get_model().mm_projector.parameters():
        p.requires_grad = True
    args = llava_train.TrainingArguments(
        output_dir=str(tmp_path / "run"), learning_rate=1e-4, mm_projector_lr=5e-2, report_to=[], use_cpu=True
    )
    trainer = llava_train.LLaVATrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    fusion = {id(p) for p in model.get_model().mm_projector.parameters()}
    grouped = {id(p) for g in optimizer.param_groups if g.get("lr") == 5e-2 for p in g["params"]}
    assert fusion == grouped  # every fusion parameter trains at --mm_projector_lr
    for step in range(steps):
        optimizer.zero_grad()
        loss = model(**batch(step)).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()


def standalone(tower_dir, model, projector_type: str) -> FusionProjector:
    """The same module built with the layerfuse API alone, holding the trained weights."""
    if projector_type == "mmfuser":
        fuser, layers = MMFuser(WIDTH, 4, 16, 4), (0, 2, 3, 4, 5)
    else:
        plan = preset_plan(projector_type, DEPTH)
        fuser, layers = plan.build(WIDTH), plan.layers
    module = FusionProjector(fuser, Projector("mlp2x_gelu", fuser.out_dim, LLM_WIDTH), layers=layers)
    module.load_state_dict(model.get_model().mm_projector.state_dict())
    return module


def standalone_tokens(tower_dir, module: FusionProjector, images: torch.Tensor) -> torch.Tensor:
    vit = transformers.CLIPVisionModel.from_pretrained(tower_dir)
    with torch.no_grad():
        return module(LayerTap(vit, module.layers, tokens=module.tokens)(images))


@pytest.mark.parametrize("projector_type", TYPES)
def test_train_then_stage1_save_and_reload(tower_dir, llava_train, tmp_path, projector_type):
    with patched():
        model = build(tower_dir, projector_type)
        projector = model.get_model().mm_projector
        assert isinstance(projector, lf_llava.LlavaFusionProjector)
        before = {k: v.clone() for k, v in projector.state_dict().items()}
        stage1_train(model, llava_train, tmp_path)
        assert any(not torch.equal(before[k], v) for k, v in projector.state_dict().items())
        if projector_type == "mmfuser":
            assert projector.fuser.gamma1.abs().sum() > 0  # past the identity start

        images = batch(7)["images"]
        with torch.no_grad():
            tokens = model.encode_images(images)
        module = standalone(tower_dir, model, projector_type)
        assert tokens.shape == (2, (IMAGE // PATCH) ** 2, LLM_WIDTH)
        assert torch.equal(tokens, standalone_tokens(tower_dir, module, images))

        # LLaVA's stage-1 save (safe_save_model_for_hf_trainer with tune_mm_mlp_adapter) ...
        weights = llava_train.get_mm_adapter_state_maybe_zero_3(model.named_parameters(), ["mm_projector"])
        assert weights
        assert all(k.startswith("model.mm_projector.") for k in weights)
        adapter = tmp_path / "mm_projector.bin"
        torch.save(weights, adapter)
        # ... and stage 2 starting from it with --pretrain_mm_mlp_adapter
        reloaded = build(tower_dir, projector_type, adapter=adapter, seed=5)
        with torch.no_grad():
            assert torch.equal(reloaded.encode_images(images), tokens)

        # a whole checkpoint: config.json alone rebuilds the module (LlavaMetaModel.__init__, delay_load)
        model.config.save_pretrained(tmp_path / "ckpt")
        config = LlavaConfig.from_pretrained(tmp_path / "ckpt")
        assert config.mm_layerfuse["projector_type"] == projector_type
        restored = LlavaLlamaForCausalLM(config)
        assert not restored.get_model().get_vision_tower().is_loaded
        restored.get_model().get_vision_tower().load_model()
        restored.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.equal(restored.encode_images(images), tokens)


@pytest.mark.parametrize("projector_type", TYPES)
def test_lora_targets_never_include_fusion_modules(tower_dir, llava_train, projector_type):
    peft = pytest.importorskip("peft")
    with patched():
        model = build(tower_dir, projector_type)
    names = set(llava_train.find_all_linear_names(model))
    fusion_leaves = {
        name.split(".")[-1]
        for name, m in model.get_model().mm_projector.named_modules()
        if isinstance(m, nn.Linear)
    }
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not names & fusion_leaves - {"q_proj", "k_proj", "v_proj", "o_proj"}
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=sorted(names)))
    wrapped = [n for n, m in lora.named_modules() if hasattr(m, "lora_A") and "mm_projector" in n]
    assert wrapped == []


def test_mmfuser_at_init_gives_the_stock_llava_loss(tower_dir):
    stock = build(tower_dir, "mlp2x_gelu")  # LLaVA's own builders: CLIPVisionTower, nn.Sequential
    assert type(stock.get_model().get_vision_tower()).__name__ == "CLIPVisionTower"
    with patched():
        fused = build(tower_dir, "mmfuser", seed=3)
    fused.load_state_dict(
        {
            **{k: v for k, v in stock.state_dict().items() if "mm_projector" not in k},
            **{k.replace("mm_projector.", "mm_projector.projector."): v
               for k, v in stock.state_dict().items() if "mm_projector" in k},
            **{k: v for k, v in fused.state_dict().items() if "mm_projector.fuser." in k},
        }
    )
    inputs = batch(1)
    with torch.no_grad():
        assert torch.equal(fused(**inputs).loss, stock(**inputs).loss)
        assert torch.equal(fused.encode_images(inputs["images"]), stock.encode_images(inputs["images"]))


@pytest.mark.parametrize("projector_type", ["mmfuser", "dense_connector_dci"])
def test_bf16_forward_and_backward(tower_dir, projector_type):
    with patched():
        model = build(tower_dir, projector_type).to(torch.bfloat16)
    loss = model(**batch(2, torch.bfloat16)).loss
    assert loss.dtype == torch.float32 or loss.dtype == torch.bfloat16
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.get_model().mm_projector.parameters() if p.grad is not None]
    assert grads
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_stock_types_keep_llava_behaviour_when_patched(tower_dir):
    stock = build(tower_dir, "mlp2x_gelu")
    with patched():
        ours = build(tower_dir, "mlp2x_gelu")
    tower = ours.get_model().get_vision_tower()
    assert isinstance(tower, lf_llava.LayerfuseVisionTower)
    assert type(ours.get_model().mm_projector) is nn.Sequential
    assert stock.state_dict().keys() == ours.state_dict().keys()
    ours.load_state_dict(stock.state_dict())
    images = batch(3)["images"]
    with torch.no_grad():
        assert torch.equal(ours.encode_images(images), stock.encode_images(images))
    for name in ("hidden_size", "num_patches", "num_patches_per_side", "dtype", "device", "is_loaded"):
        assert getattr(tower, name) == getattr(stock.get_model().get_vision_tower(), name)


def authors_model(tmp_path, projector_type: str, adapter, *, width: int, llm_width: int, grid: int, **extra):
    """A LLaVA model on a 24-block CLIP tower given as a config object (no folder, random weights),
    built in float64 so float64 fixture weights load exactly (LLaVA builds mm_projector in the default
    dtype), with ``--pretrain_mm_mlp_adapter adapter``."""
    tower = transformers.CLIPVisionConfig(
        hidden_size=width, intermediate_size=32, num_hidden_layers=24, num_attention_heads=2, image_size=8 * grid,
        patch_size=8,
    )
    config = LlavaConfig(vocab_size=16, hidden_size=llm_width, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    for key, value in extra.items():
        setattr(config, key, value)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with patched():
            model = LlavaLlamaForCausalLM(config)
            args = SimpleNamespace(**{**vars(model_args("", projector_type, adapter)), "vision_tower": tower})
            model.get_model().initialize_vision_modules(args)
    finally:
        torch.set_default_dtype(default)
    projector = model.get_model().mm_projector
    assert projector.projector[0].weight.dtype == torch.float64
    assert projector.layers == model.get_model().get_vision_tower().tap.resolved_layers
    return projector


def test_authors_mmfuser_checkpoint_loads_through_pretrain_adapter(tmp_path):
    """``mmfuser_small`` (the authors' module, float64, heads 8, 4 levels, grid 6) written as their
    ``mm_projector.bin`` and loaded by LLaVA's ``--pretrain_mm_mlp_adapter`` into a 24-block tower
    (so the layers are the authors' 3, 8, 13, 18, 23)."""
    fx = load_fixture("mmfuser_small")
    adapter = tmp_path / "mm_projector.bin"
    torch.save(fx.checkpoint("model.mm_projector."), adapter)
    projector = authors_model(tmp_path, "mmfuser", adapter, width=128, llm_width=64, grid=6, mm_mmfuser_heads=8)
    assert projector.layers == (3, 8, 13, 18, 23)
    features = LayerFeatures(fx.inputs(), grid=(6, 6), layers=projector.layers)
    assert_fixture_close(projector(features), fx["output"], name="mmfuser_small output")
    assert_fixture_close(projector.fuser(features), fx["block_output"], name="mmfuser_small block_output")


def test_authors_dense_connector_and_lin_checkpoints(tmp_path):
    """Dense Connector's ``mm_projector.bin`` loads as it is; Lin et al.'s ``mm_projector_f`` keys make
    LLaVA's own loader fail, and load once converted by ``save_mm_adapter``."""
    dense = load_fixture("dense_connector_dci")
    adapter = tmp_path / "dense_connector.bin"
    torch.save(dense.checkpoint("model.mm_projector."), adapter)
    projector = authors_model(tmp_path, "dense_connector_dci", adapter, width=16, llm_width=24, grid=5)
    hidden = dense.hidden_states()
    features = LayerFeatures([hidden[k][:, 1:] for k in projector.layers], grid=(5, 5), layers=projector.layers)
    assert_fixture_close(projector(features), dense["output"], name="dense_connector_dci output")

    lin = load_fixture("lin_ed_3-18-23")
    raw = tmp_path / "lin_raw.bin"
    torch.save(lin.checkpoint(), raw)
    with pytest.raises(IndexError):  # LLaVA's get_w splits 'model.mm_projector_f.0.weight' on 'mm_projector.'
        authors_model(tmp_path, "lin_ed_3_18_23", raw, width=16, llm_width=24, grid=5)
    converted = lf_llava.save_mm_adapter(
        from_official("lin_ed", lin.checkpoint(), strategy="3-18-23", tower="clip"), tmp_path / "lin.bin"
    )
    projector = authors_model(tmp_path, "lin_ed_3_18_23", converted, width=16, llm_width=24, grid=5)
    hidden = lin.hidden_states()
    features = LayerFeatures([hidden[k][:, 1:] for k in projector.layers], grid=(5, 5), layers=projector.layers)
    assert_fixture_close(projector(features), lin["output"], name="lin_ed_3-18-23 output")
