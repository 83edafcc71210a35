"""DDP and FSDP2 (fully_shard) on two gloo ranks on the CPU: training equals one process, and
save_pretrained gathers full tensors and records the layerfuse class; the files load back."""

import json

import pytest
import torch
import torch.distributed as dist

from distributed_workers import SCENARIOS, WORLD_SIZE, single_process, worker
from layerfuse import ConcatFuser, FusionProjector, MMFuser, Projector
from layerfuse.serialization import CONFIG_NAME, PretrainedMixin, full_state_dict, real_class
from spawn_ranks import spawn_ranks

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One spawn of two gloo ranks that runs every scenario of distributed_workers.SCENARIOS."""
    out = tmp_path_factory.mktemp("distributed")
    spawn_ranks(worker, out, WORLD_SIZE)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "strategy", "expected_class"),
    [
        ("mmfuser", "ddp", "MMFuser"),
        ("mmfuser", "fsdp2", "MMFuser"),
        ("pipeline", "fsdp2", "FusionProjector"),
    ],
)
def test_two_ranks_train_like_one_process_and_save(two_ranks, kind, strategy, expected_class):
    assert (kind, strategy) in SCENARIOS
    folder = two_ranks / f"{kind}-{strategy}"
    result = torch.load(folder / "result.pt", weights_only=True)
    reference_state, reference_out = single_process(kind)

    saved = json.loads((folder / "saved" / CONFIG_NAME).read_text())
    assert saved["class"] == expected_class
    if kind == "pipeline":
        assert saved["config"]["fuser"]["class"] == "ConcatFuser"  # not FSDPConcatFuser
    assert "FSDP" not in json.dumps(saved)
    assert result["loaded_class"] == expected_class
    # gradients averaged over two half batches equal the whole batch's, to rounding
    assert set(result["loaded_state"]) == set(reference_state)
    for key, value in reference_state.items():
        torch.testing.assert_close(result["loaded_state"][key], value, rtol=0, atol=1e-12, msg=key)
    torch.testing.assert_close(result["reloaded_out"], reference_out, rtol=0, atol=1e-12)


def test_fsdp_generated_classes_are_not_registered():
    # fully_shard makes a class FSDP<Name> inside torch; it must never become a saved class name
    assert all(not name.startswith("FSDP") for name in PretrainedMixin.registry)


def test_compiled_module_saves_the_plain_class_and_keys(tmp_path):
    fuser = ConcatFuser([4, 4], norm=True)
    compiled = torch.compile(fuser)
    assert real_class(compiled) is ConcatFuser
    compiled.save_pretrained(tmp_path / "whole")
    assert json.loads((tmp_path / "whole" / CONFIG_NAME).read_text())["class"] == "ConcatFuser"

    # a compiled submodule: the config names the fuser's class and keys carry no _orig_mod.
    pipeline = FusionProjector(MMFuser(8, 1, 2, 2, grid=(2, 2)), Projector("linear", 8, 4), layers=[1, 2])
    pipeline.fuser = torch.compile(pipeline.fuser)
    assert all("_orig_mod" not in k for k in full_state_dict(pipeline))
    pipeline.save_pretrained(tmp_path / "nested")
    saved = json.loads((tmp_path / "nested" / CONFIG_NAME).read_text())
    assert saved["config"]["fuser"]["class"] == "MMFuser"
    again = FusionProjector.from_pretrained(tmp_path / "nested")
    expected = full_state_dict(pipeline)
    assert again.state_dict().keys() == expected.keys()
    for key, value in again.state_dict().items():
        assert torch.equal(value, expected[key]), key



def test_an_abort_after_a_rank_is_done_warns_and_before_fails(tmp_path):
    import torch.multiprocessing as mp

    from spawn_ranks import abort_after_done, abort_before_done

    (tmp_path / "after").mkdir()
    (tmp_path / "before").mkdir()
    with pytest.warns(RuntimeWarning, match="after finishing its work"):
        spawn_ranks(abort_after_done, tmp_path / "after", 2)
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        spawn_ranks(abort_before_done, tmp_path / "before", 2)
