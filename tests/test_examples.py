"""Every script in ``examples/`` runs to the end, offline, against the current API.

The README and the install page point new users at these scripts; after an API change they are the
first thing to break unnoticed, as nothing else imports them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# What each script needs beyond the core (it says so in its docstring); absent ones skip the script.
NEEDS = {
    "dense_connector_from_checkpoint.py": ("transformers",),
    "hf_llava_mmfuser.py": ("transformers",),
    "instruction_gated.py": ("transformers",),
    "internal_fusion.py": ("transformers",),
    "layer_similarity.py": ("timm", "matplotlib"),
    "llava_codebase.py": ("transformers", "llava", "deepspeed"),
    "mmfuser_llava.py": ("transformers", "timm"),
    "presets_and_one_calling_convention.py": ("timm",),
    "tap_any_vit.py": (),
}


def test_every_example_is_listed():
    assert sorted(NEEDS) == [path.name for path in EXAMPLES]


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs_offline(path, tmp_path):
    missing = [module for module in NEEDS[path.name] if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",  # a download attempt fails instead of waiting on the network
        "TRANSFORMERS_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert result.stdout.strip(), f"{path.name} printed nothing"
