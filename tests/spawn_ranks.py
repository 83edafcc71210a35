"""Spawning gloo ranks for the distributed tests, and telling a rank's failure from torch's teardown.

A rank that has finished its work (and said so with ``mark_done``) can still die with SIGABRT while
the interpreter shuts gloo down ("terminate called without an active exception": gloo's worker
threads outliving the interpreter, pytorch/pytorch#179291). That abort happens after every result
is written, so it is reported as a warning; an abort or error before a rank is done still fails.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp


def mark_done(out: str | Path, rank: int) -> None:
    """Called by a worker once its share of the work is complete, before a last barrier (so that every
    rank has reported before any starts tearing the process group down)."""
    (Path(out) / f"rank{rank}.done").touch()


def spawn_ranks(worker: Callable[..., None], out: Path, world_size: int) -> None:
    """Run ``worker(rank, str(out))`` on ``world_size`` spawned processes and wait for them."""
    try:
        mp.spawn(worker, args=(str(out),), nprocs=world_size, join=True)
    except mp.ProcessExitedException as err:
        finished = all((out / f"rank{rank}.done").exists() for rank in range(world_size))
        if not (finished and err.signal_name == "SIGABRT"):
            raise
        warnings.warn(
            f"rank {err.error_index} aborted while shutting down gloo, after finishing its work "
            f"(pytorch/pytorch#179291): {err}",
            RuntimeWarning,
            stacklevel=2,
        )


def abort_after_done(rank: int, out: str) -> None:
    """Rank 1 dies with SIGABRT after reporting done, as in a gloo teardown abort (for the tests)."""
    mark_done(out, rank)
    while not all((Path(out) / f"rank{r}.done").exists() for r in range(2)):  # as the final barrier
        time.sleep(0.01)
    if rank == 1:
        os.abort()


def abort_before_done(rank: int, out: str) -> None:
    """Rank 1 dies with SIGABRT before reporting done: a real failure (for the tests)."""
    if rank == 1:
        os.abort()
    mark_done(out, rank)
