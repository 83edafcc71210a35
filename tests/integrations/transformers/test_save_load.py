import subprocess
import sys
import textwrap

import pytest
import torch

import hf_tiny
from hf_tiny import IMAGE, TEXT_DIM

transformers = pytest.importorskip("transformers")
integration = pytest.importorskip("layerfuse.integrations.transformers")
st = pytest.importorskip("safetensors.torch")


def saved(tmp_path, family="igva"):
    module = hf_tiny.fusion_projector(family)
    model = integration.fuse_llava(hf_tiny.llava(), module)
    model.save_pretrained(tmp_path)
    return model


def batch():
    g = torch.Generator().manual_seed(3)
    return {
        "input_ids": hf_tiny.prompt(16),
        "pixel_values": torch.randn(2, 3, IMAGE, IMAGE, generator=g),
        "instruction_embeds": torch.randn(2, TEXT_DIM, generator=g),
    }


def test_save_then_auto_class_load_in_a_fresh_process_gives_the_same_logits(tmp_path):
    model = saved(tmp_path / "model")
    inputs = batch()
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    script = textwrap.dedent(f"""
        import torch
        import layerfuse
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "model")!r}).eval()
        assert type(model).__name__ == "LayerfuseLlavaForConditionalGeneration", type(model)
        with torch.no_grad():
            logits = model(**torch.load({str(tmp_path / "inputs.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_config_stores_the_fusion_projector_config(tmp_path):
    model = saved(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "layerfuse_llava"
    assert config.fusion == model.model.multi_modal_projector.get_config()
    assert config.fusion["fuser"]["class"] == "InstructionGatedFuser"


def _rewrite(path, edit):
    weights = path / "model.safetensors"
    state = st.load_file(str(weights))
    edit(state)
    st.save_file(state, str(weights), metadata={"format": "pt"})


def test_missing_fusion_weights_fail_loudly(tmp_path):
    saved(tmp_path)
    _rewrite(tmp_path, lambda s: s.pop("model.multi_modal_projector.projector.0.weight"))
    with pytest.raises(ValueError, match=r"lacks or misshapes fusion projector weights .*projector\.0\.weight"):
        transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)


def test_misshaped_fusion_weights_fail_loudly(tmp_path):
    saved(tmp_path)

    def shrink(state):
        key = "model.multi_modal_projector.fuser.gate.linear.weight"
        state[key] = state[key][:1]

    _rewrite(tmp_path, shrink)
    # transformers itself refuses a size mismatch by default; with ignore_mismatched_sizes it would reinitialise
    with pytest.raises((ValueError, RuntimeError), match="ignore_mismatched_sizes"):
        transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lacks or misshapes fusion projector weights .*gate\.linear\.weight"):
        transformers.AutoModelForImageTextToText.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


def test_a_fused_model_built_from_its_config_keeps_the_fusers_own_initialisation():
    module = hf_tiny.fusion_projector("cross_attention")
    config = integration.fuse_llava(hf_tiny.llava(), module).config
    fresh = integration.LayerfuseLlavaForConditionalGeneration(config)
    # CrossAttentionFuser starts as the identity on its query layer: zero layer scales
    scales = [p for n, p in fresh.model.multi_modal_projector.fuser.named_parameters() if n.startswith("ls_")]
    assert scales
    assert all(torch.count_nonzero(p) == 0 for p in scales)
