"""Timing and peak-memory measurement shared by every benchmark script.

Each case is timed as the median of ``repeats`` runs after ``warmup`` runs. Peak memory is the extra
memory a single run needs above what was live before it: on CUDA from the caching allocator's peak
counter, on the CPU from the process's peak resident set (Linux resets it through
``/proc/self/clear_refs``), so CPU figures include allocator slack and are comparable between rows of
one run rather than exact byte counts.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Result", "base_parser", "devices_from", "environment", "measure", "print_table", "write_json"]

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class Result:
    """One measured row: a case, its settings, the median time and the peak extra memory."""

    case: str
    device: str
    dtype: str
    mode: str
    median_ms: float
    peak_mib: float
    repeats: int
    settings: dict[str, Any] = field(default_factory=dict)
    times_ms: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field_name: str) -> int:
    match = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


def _peak_extra_mib(fn: Callable[[], Any], device: torch.device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return (peak - before) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _rss_kib("VmRSS")
    out = fn()
    peak = _rss_kib("VmHWM")
    del out
    return (peak - before) / 1024


def measure(
    fn: Callable[[], Any],
    *,
    case: str,
    device: torch.device,
    dtype: torch.dtype,
    mode: str,
    warmup: int = 2,
    repeats: int = 5,
    settings: dict[str, Any] | None = None,
) -> Result:
    """Time ``fn`` (median of ``repeats`` after ``warmup``) and measure its peak extra memory."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = _peak_extra_mib(fn, device)
    return Result(
        case=case,
        device=device.type,
        dtype=str(dtype).removeprefix("torch."),
        mode=mode,
        median_ms=statistics.median(times),
        peak_mib=peak,
        repeats=repeats,
        settings=settings or {},
        times_ms=times,
    )


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def print_table(results: Sequence[Result], *, title: str, baseline: Callable[[Result], str | None] | None = None) -> None:
    """Print one aligned table. ``baseline(row)`` names the case a row's ratio columns compare with."""
    by_key = {(r.case, r.device, r.dtype, r.mode, json.dumps(r.settings, sort_keys=True)): r for r in results}
    header = ["case", "device", "dtype", "mode", "settings", "median ms", "peak MiB", "speed-up", "mem ratio"]
    rows = []
    for r in results:
        speed = mem = ""
        ref_name = baseline(r) if baseline else None
        ref = by_key.get((ref_name, r.device, r.dtype, r.mode, json.dumps(r.settings, sort_keys=True))) if ref_name else None
        if ref is not None and ref is not r:
            speed = f"{ref.median_ms / r.median_ms:.2f}x"
            mem = f"{r.peak_mib / ref.peak_mib:.2f}" if ref.peak_mib > 0 else ""
        settings = " ".join(f"{k}={v}" for k, v in r.settings.items())
        rows.append([r.case, r.device, r.dtype, r.mode, settings, f"{r.median_ms:.2f}", f"{r.peak_mib:.1f}", speed, mem])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def write_json(results: Sequence[Result], path: str | Path, *, benchmark: str, extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": benchmark,
        "environment": environment(),
        "results": [asdict(r) for r in results],
        **(extra or {}),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def base_parser(description: str, *, default_json: str) -> argparse.ArgumentParser:
    """Flags every benchmark shares: device, repeats, warm-up, JSON path and a quick smoke mode."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="where to run; 'all' = CPU plus CUDA when present (default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: checks the script runs")
    parser.add_argument("--json", default=str(RESULTS_DIR / default_json), help="where to write the JSON results")
    return parser


def devices_from(arg: str) -> list[torch.device]:
    devices = []
    if arg in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if arg in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if arg == "cuda" and not devices:
        raise SystemExit("--device cuda: no CUDA device is available")
    return devices
