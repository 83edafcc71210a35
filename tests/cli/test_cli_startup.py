"""Start-up of the ``layerfuse`` command and package: what gets imported, and when."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import layerfuse
from layerfuse.cli.main import COMMANDS, SUMMARIES

# Runs the console entry point in a fresh interpreter and reports whether torch got imported.
_PROBE = """
import sys
from layerfuse.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit_info:
    code = exit_info.code
print("torch imported:", "torch" in sys.modules, "exit:", code)
"""


def probe(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True,
                            check=False, timeout=120, env=env)
    return result.stdout, result.stderr


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["-h"], []])
def test_version_and_help_do_not_import_torch(argv):
    out, err = probe(*argv)
    assert "torch imported: False" in out, out + err
    if argv == ["--version"]:
        assert f"layerfuse {layerfuse.__version__}" in out
    else:
        assert all(f"    {name}" in out and SUMMARIES[name].split()[0] in out for name in COMMANDS)


def test_a_command_imports_only_itself():
    out, _ = probe("similarity", "--help")
    assert "torch imported: True" in out
    assert "--from-json" in out
    assert "layerfuse.cli.demo" not in out


def test_unknown_top_level_arguments_are_an_error():
    out, err = probe("--frobnicate")
    assert "unrecognized arguments: --frobnicate" in err
    assert "exit: 2" in out


def test_import_layerfuse_is_lazy_but_complete():
    code = (
        "import sys, layerfuse; before = 'torch' in sys.modules; "
        "fuser = layerfuse.MMFuser; from layerfuse import LayerTap; "
        "print(before, 'torch' in sys.modules, fuser.__module__, layerfuse.fusers.MMFuser is fuser)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.split() == ["False", "True", "layerfuse.fusers.mmfuser", "True"]


def test_every_public_name_resolves():
    for name in layerfuse.__all__:
        assert getattr(layerfuse, name) is not None
    assert set(layerfuse.__all__) <= set(dir(layerfuse))
    with pytest.raises(AttributeError, match=r"module 'layerfuse' has no attribute 'NoSuchFuser'"):
        layerfuse.NoSuchFuser
    with pytest.raises(AttributeError, match=r"module 'layerfuse' has no attribute '_private'"):
        layerfuse._private
