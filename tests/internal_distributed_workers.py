"""Worker processes of tests/internal/test_distributed.py (a module of its own so spawned children can
import it): a tiny Llama with an internal fusion, trained on two gloo ranks under DDP or FSDP2."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from internal_llm import tiny_llama
from layerfuse.internal import DeepStack, InternalDirect, InternalModular
from spawn_ranks import mark_done

WORLD_SIZE = 2
STEPS = 2
LR = 0.1
SCENARIOS = [("direct", "ddp"), ("modular", "ddp"), ("direct", "fsdp2"), ("deepstack", "fsdp2")]


class VisionLanguageModel(nn.Module):
    """The host a user trains: the frozen LLM and the fusion, features injected around the LLM call."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.llm = tiny_llama(dtype=torch.float64).requires_grad_(False)
        fusions = {
            "direct": lambda: InternalDirect(16, 32, [0, 2], dtype=torch.float64),
            "modular": lambda: InternalModular(16, 32, [1], num_heads=4, intermediate_size=64, dtype=torch.float64),
            "deepstack": lambda: DeepStack(16, 32, num_levels=2, projector="linear", dtype=torch.float64),
        }
        self.fusion = fusions[kind]()
        with torch.no_grad():
            for p in self.fusion.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        self.fusion.attach(self.llm)

    def forward(self, input_ids, image_token_mask, levels):
        with self.fusion.inject(levels, image_token_mask):
            return self.llm(input_ids=input_ids).logits


def batch():
    """Four samples of one length, one 4-token image each at different positions; identical everywhere."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (4, 12), generator=g)
    for b in range(4):
        ids[b, b + 1: b + 5] = 63
    mask = ids == 63
    levels = [torch.randn(4, 4, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    target = torch.randn(4, 12, 64, generator=g, dtype=torch.float64)
    return ids, mask, levels, target


def train(model: nn.Module, fusion_levels: int, rows: slice) -> None:
    ids, mask, levels, target = batch()
    levels = [lv[rows] for lv in levels[:fusion_levels]]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(ids[rows], mask[rows], levels), target[rows])
        loss.backward()
        optimizer.step()


def levels_of(kind: str) -> int:
    return 1 if kind == "modular" else 2


def full_state(fusion: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in fusion.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        out[name] = full.detach().clone()
    return out


def single_process(kind: str) -> dict[str, torch.Tensor]:
    model = VisionLanguageModel(kind)
    train(model, levels_of(kind), slice(0, 4))
    return full_state(model.fusion)


def worker(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    try:
        results = {}
        for kind, strategy in SCENARIOS:
            model = VisionLanguageModel(kind)
            if strategy == "ddp":
                wrapped: nn.Module = nn.parallel.DistributedDataParallel(model)
            else:
                from torch.distributed.fsdp import fully_shard

                parts = model.fusion.mergers if kind == "deepstack" else model.fusion.projectors
                for part in [*parts, *getattr(model.fusion, "blocks", [])]:
                    fully_shard(part)  # the hooks call these directly, so each is its own unit
                fully_shard(model.fusion)
                wrapped = model
            train(wrapped, levels_of(kind), slice(2 * rank, 2 * rank + 2))
            results[f"{kind}-{strategy}"] = full_state(model.fusion)
            model.fusion.detach()
        if rank == 0:
            torch.save(results, Path(out) / "result.pt")
        mark_done(out, rank)  # after rank 0's file is written
        dist.barrier()  # every rank has reported done before any starts tearing gloo down
    finally:
        dist.destroy_process_group()
