"""Every script in ``benchmarks/`` runs to the end in its quick mode, against the current API.

Benchmarks are run by hand, so nothing else imports them: an API change (presets that need a
depth, say) breaks them unnoticed until someone wants the numbers. The quick mode runs every case
once at tiny shapes; the numbers it prints are not looked at.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# Script -> (command-line arguments of its cheapest full run, modules it needs beyond the core).
RUNS = {
    "cross_attention_scaling.py": (["--quick", "--device", "cpu"], ()),
    "deform_attn.py": (["--quick", "--device", "cpu"], ()),
    "fusers.py": (["--quick", "--device", "cpu"], ("transformers",)),
    "hf_llava.py": (["--quick", "--device", "cpu"], ("transformers",)),
    "internal_fusion.py": (["--quick", "--device", "cpu"], ("transformers",)),
    # a profile, not a table of results: one step per module at the real shape (about 10 s)
    "mmfuser_profile.py": (["--repeats", "1", "--threads", "1"], ()),
    "similarity.py": (["--quick", "--device", "cpu"], ()),
    "taps.py": (["--quick", "--device", "cpu"], ("transformers", "timm")),
}


def test_every_benchmark_is_listed():
    scripts = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "harness.py")
    assert sorted(RUNS) == scripts


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs_in_quick_mode(script, tmp_path):
    args, needs = RUNS[script]
    missing = [module for module in needs if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"{script} needs {', '.join(missing)}")
    writes_json = "--quick" in args
    if writes_json:
        args = [*args, "--json", str(tmp_path / "results.json")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, script, *args], cwd=BENCHMARKS, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    if writes_json:
        written = json.loads((tmp_path / "results.json").read_text())
        assert written, f"{script} wrote an empty JSON file"
