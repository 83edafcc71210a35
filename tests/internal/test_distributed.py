"""Internal fusion trained on two gloo CPU ranks (DDP and FSDP2) equals training in one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from internal_distributed_workers import WORLD_SIZE, worker
    from spawn_ranks import spawn_ranks

    out = tmp_path_factory.mktemp("internal_distributed")
    spawn_ranks(worker, out, WORLD_SIZE)
    return torch.load(out / "result.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "strategy"), [("direct", "ddp"), ("modular", "ddp"), ("direct", "fsdp2"),
                                                ("deepstack", "fsdp2")])
def test_two_ranks_train_like_one_process(two_ranks, kind, strategy):
    from internal_distributed_workers import single_process

    reference = single_process(kind)
    result = two_ranks[f"{kind}-{strategy}"]
    assert set(result) == set(reference)
    moved = False
    for key, value in reference.items():
        torch.testing.assert_close(result[key], value, rtol=0, atol=1e-12, msg=key)
        moved |= not torch.equal(value, _initial(kind)[key])
    assert moved


def _initial(kind):
    from internal_distributed_workers import VisionLanguageModel, full_state

    return full_state(VisionLanguageModel(kind).fusion)
