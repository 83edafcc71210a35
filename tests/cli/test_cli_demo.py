"""The ``layerfuse`` command line: version, help and the demo (in-process and as a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from layerfuse import __version__
from layerfuse.cli import demo
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


def test_demo_small_prints_the_tap_table(capsys):
    assert main(["demo", "--small", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "DemoViT (tiny): 24 blocks, width 64" in out
    lines = out.splitlines()
    assert lines[lines.index(next(x for x in lines if x.startswith("layer "))) + 2 :][:5] == [
        "-22    3         2x16x64          4x4   MMFuser",
        "-17    8         2x16x64          4x4   MMFuser",
        "-12    13        2x16x64          4x4   MMFuser",
        "-7     18        2x16x64          4x4   MMFuser",
        "-2     23        2x16x64          4x4   LLaVA-1.5, MMFuser",
    ]
    assert "stopped after block 23 of 24" in out


def test_demo_steps_share_features():
    captured = []
    step = demo.DemoStep("probe", lambda ctx: captured.append(ctx.features) or demo.Table("probe", ("x",), []))
    demo.STEPS.append(step)
    try:
        assert main(["demo", "--small"]) == 0
    finally:
        demo.STEPS.remove(step)
    (features,) = captured
    assert features["LLaVA-1.5"].layers == (-2,)
    assert features["MMFuser"].layers == (-22, -17, -12, -7, -2)
    assert features["MMFuser"][-1] is features["LLaVA-1.5"][0]
    assert features["MMFuser"].grid == (4, 4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--small", "--batch", "0"], "--batch expected a positive int, got 0"),
        (["demo", "--small", "--device", "gpu"], "--device expected a torch device"),
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
    assert "LLaVA-1.5, MMFuser" in result.stdout
