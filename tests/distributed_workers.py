"""Worker processes of tests/test_distributed.py (a module of its own so spawned children can import it).

Each worker joins a 2-rank gloo group on the CPU, trains a small float64 module wrapped by DDP or FSDP2
on its half of the batch, and saves it with ``save_pretrained``; rank 0 writes what it observed to
``out/result.pt`` for the test process to compare with training in one process.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from layerfuse import ConcatFuser, FusionProjector, MMFuser, Projector
from layerfuse.serialization import real_class
from spawn_ranks import mark_done

WORLD_SIZE = 2
BATCH = 4  # split 2 + 2 over the ranks
STEPS = 3
LR = 0.1
GRID = (3, 3)


def build_mmfuser() -> MMFuser:
    torch.manual_seed(0)
    # a non-zero layer-scale so every parameter gets a gradient from the first step
    return MMFuser(8, num_levels=2, heads=2, points=2, grid=GRID, layer_scale_init=0.5, dtype=torch.float64)


def build_pipeline() -> FusionProjector:
    torch.manual_seed(0)
    fuser = ConcatFuser([8, 8], norm=True, dtype=torch.float64)
    return FusionProjector(fuser, Projector("mlp2x_gelu", 16, 6, dtype=torch.float64), layers=[-2, -1])


BUILDERS = {"mmfuser": build_mmfuser, "pipeline": build_pipeline}


def batch(kind: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The full batch of features and regression targets, identical in every process."""
    g = torch.Generator().manual_seed(1)
    inputs = 3 if kind == "mmfuser" else 2
    feats = [torch.randn(BATCH, 9, 8, generator=g, dtype=torch.float64) for _ in range(inputs)]
    width = 8 if kind == "mmfuser" else 6
    return feats, torch.randn(BATCH, 9, width, generator=g, dtype=torch.float64)


def train(model: nn.Module, feats: list[torch.Tensor], target: torch.Tensor) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(feats), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def single_process(kind: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What training on the whole batch in one process gives: the weights and the output."""
    model = BUILDERS[kind]()
    feats, target = batch(kind)
    train(model, feats, target)
    with torch.no_grad():
        out = model(feats)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, out


SCENARIOS = (("mmfuser", "ddp"), ("mmfuser", "fsdp2"), ("pipeline", "fsdp2"))


def worker(rank: int, out: str) -> None:
    """Run every scenario in one process group (one spawn: starting processes is the slow part)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD_SIZE)
    try:
        for kind, strategy in SCENARIOS:
            folder = Path(out) / f"{kind}-{strategy}"
            folder.mkdir(exist_ok=True)
            _run(rank, kind, strategy, folder)
            dist.barrier()
        mark_done(out, rank)
        dist.barrier()  # every rank has reported done before any starts tearing gloo down
    finally:
        dist.destroy_process_group()


def _run(rank: int, kind: str, strategy: str, out: Path) -> None:
    model = BUILDERS[kind]()
    feats, target = batch(kind)
    half = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    mine = [f[half] for f in feats]
    if strategy == "ddp":
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model)
        train(wrapped, mine, target[half])
        saver = wrapped.module  # DDP's documented access to the wrapped module
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        if kind == "pipeline":
            fully_shard(model.fuser, mesh=mesh)
            fully_shard(model.projector, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train(model, mine, target[half])
        saver = model
    saver.save_pretrained(out / "saved")  # every rank calls; under FSDP2 it all-gathers
    # every rank may read the files as soon as save_pretrained returns
    loaded = real_class(saver).from_pretrained(out / "saved")
    with torch.no_grad():
        reloaded_out = loaded(feats)
    if rank == 0:
        torch.save(
            {
                "class_name": type(saver).__name__,
                "loaded_class": type(loaded).__name__,
                "loaded_state": loaded.state_dict(),
                "reloaded_out": reloaded_out,
            },
            out / "result.pt",
        )
