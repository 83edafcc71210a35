"""The ``layerfuse`` command line: version, help and the demo (in-process and as a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from layerfuse import __version__
from layerfuse._optional import install_hint
from layerfuse.cli import demo, demo_hf
from layerfuse.cli.main import COMMANDS, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"layerfuse {__version__}"


def test_help_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: layerfuse" in out
    assert all(name in out for name in COMMANDS)


def _table(out: str, title: str) -> list[list[str]]:
    """The rows of the printed table called ``title``, split into cells."""
    lines = out.splitlines()
    start = lines.index(title) + 3
    rows = []
    for line in lines[start:]:
        if not line or line.startswith(("one forward", "random weights")):
            break
        rows.append([cell.strip() for cell in line.split("  ") if cell.strip()])
    return rows


def test_demo_small_taps_once_and_runs_every_fuser(capsys):
    assert main(["demo", "--small", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "DemoViT (tiny): 24 blocks, width 64" in out
    taps = {row[0]: row[1:] for row in _table(out, "Layer taps")}
    assert taps["LLaVA-1.5 (layer -2)"] == ["23", "1", "patch", "2x16x64"]
    assert taps["MMFuser"] == ["-22, -17, -12, -7, -2", "5", "patch", "2x16x64"]
    assert taps["Dense Connector DCI"] == ["0..23", "24", "patch", "2x16x64"]
    assert taps["IGVA (instruction-gated)"] == ["1..24, -2", "25", "cls_patch", "2x17x64"]
    assert "one forward for all methods" in out
    assert "patch grid 4x4; stopped after block 24 of 24" in out
    fused = {row[0]: row[1:4] for row in _table(out, "Fusers + LLaVA projector (mlp2x_gelu to 128)")}
    assert fused == {
        "LLaVA-1.5 (layer -2)": ["ConcatFuser", "2x16x64", "2x16x128"],
        "Lin et al. / look-shallower 3-18-23": ["ConcatFuser", "2x16x192", "2x16x128"],
        "Dense Connector DCI": ["ConcatFuser", "2x16x192", "2x16x128"],
        "Dense Connector STI": ["TokenConcatFuser", "2x20x64", "2x20x128"],
        "Weighted sum (softmax)": ["WeightedSumFuser", "2x16x64", "2x16x128"],
        "MMFuser": ["MMFuser", "2x16x64", "2x16x128"],
        "Cross-attention, 3x3 windows": ["CrossAttentionFuser", "2x16x64", "2x16x128"],
        "IGVA (instruction-gated)": ["InstructionGatedFuser", "2x16x128", "2x16x128"],
    }


def test_demo_steps_share_features():
    captured = []
    step = demo.DemoStep("probe", lambda ctx: captured.append(ctx.features) or demo.Table("probe", ("x",), []))
    demo.STEPS.append(step)
    try:
        assert main(["demo", "--small"]) == 0
    finally:
        demo.STEPS.remove(step)
    (features,) = captured
    assert features["LLaVA-1.5 (layer -2)"].layers == (23,)
    assert features["MMFuser"].layers == (-22, -17, -12, -7, -2)
    assert torch.equal(features["MMFuser"][-1], features["LLaVA-1.5 (layer -2)"][0])
    assert features["MMFuser"].grid == (4, 4)
    assert features["IGVA (instruction-gated)"].num_prefix_tokens == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--small", "--batch", "0"], "--batch expected a positive int, got 0"),
        (["demo", "--small", "--device", "gpu"], "--device expected a torch device"),
        (["demo", "--small", "--llm-dim", "0"], "--llm-dim expected a positive int, got 0"),
    ],
)
def test_demo_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_console_entry_point_runs_as_a_module():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny shapes: threads only add start-up and contention
    result = subprocess.run(
        [sys.executable, "-m", "layerfuse", "demo", "--small"],
        capture_output=True, text=True, check=False, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Fusers + LLaVA projector" in result.stdout


HF_TITLE = "End to end in a Hugging Face LLaVA (tiny LLM, random weights)"


def test_demo_end_to_end_section_generates_text_from_tokens(capsys):
    pytest.importorskip("transformers")
    ctx = type("Ctx", (), {"device": torch.device("cpu")})()
    table = demo.hf_step(ctx)
    assert table.title == HF_TITLE
    assert [row[0] for row in table.rows] == [
        "<s> <image> x16 what is in the image ?", "<s> <image> x16 the image shows"
    ]
    words = set(demo_hf.WORDS)
    for _, generated in table.rows:
        text = generated.strip("'")
        assert text
        assert set(text.split()) <= words  # decoded words of the vocabulary
    assert "LayerfuseLlavaForConditionalGeneration" in table.notes[0]


def test_demo_end_to_end_section_skips_with_a_note_without_transformers(monkeypatch):
    monkeypatch.setattr(demo_hf, "is_available", lambda name: name != "transformers")
    table = demo.hf_step(None)
    assert table.rows == [(f"skipped: needs transformers ({install_hint('hf')})",)]
    assert table.render().splitlines()[0] == HF_TITLE
