"""Timing and peak-memory measurement shared by every benchmark script.

Each case is timed as the median of ``repeats`` runs after ``warmup`` runs. Peak memory is the extra
memory one more run needs above what was live before it: on CUDA the caching allocator's peak counter;
on the CPU the largest total size of the tensor storages created by the run and alive at the same
time, counted op by op by a dispatch mode. (The process's resident set does not show CPU peaks: glibc
keeps freed blocks and reuses them, so later rows would read near zero. Scratch memory inside a single
ATen kernel is not seen, for any row.)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "Result",
    "base_parser",
    "devices_from",
    "environment",
    "measure",
    "measure_interleaved",
    "print_table",
    "write_json",
]

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


class _LiveTensorBytes(TorchDispatchMode):
    """Running and peak total size of the tensor storages created under it and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.layout == torch.strided:  # sparse outputs hold strided parts
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._release, key, storage.nbytes())
                    self.peak = max(self.peak, self.live)
        return out


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
    counter = _LiveTensorBytes()
    with counter:
        out = fn()
        del out
    return counter.peak / 2**20


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
    return measure_interleaved({case: fn}, device=device, dtype=dtype, mode=mode, warmup=warmup, repeats=repeats,
                               settings=settings)[0]


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    mode: str,
    warmup: int = 2,
    repeats: int = 5,
    settings: dict[str, Any] | None = None,
) -> list[Result]:
    """Like `measure` for several cases whose ratio is wanted, timed in turns (A, B, A, B, ...).

    On a shared machine the load drifts over minutes; timing the cases in alternation exposes each to
    the same load, so their ratio is steadier than from back-to-back blocks of repeats.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return [
        Result(
            case=name,
            device=device.type,
            dtype=str(dtype).removeprefix("torch."),
            mode=mode,
            median_ms=statistics.median(times[name]),
            peak_mib=_peak_extra_mib(fn, device),
            repeats=repeats,
            settings=settings or {},
            times_ms=times[name],
        )
        for name, fn in fns.items()
    ]


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
            speed = f"{ref.median_ms / r.median_ms:.3g}x"
            mem = f"{r.peak_mib / ref.peak_mib:.3g}" if ref.peak_mib > 0 else ""
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
