import pytest
import torch

import hf_tiny
from hf_tiny import IMAGE, IMAGE_TOKEN

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
integration = pytest.importorskip("layerfuse.integrations.transformers")

CLASSES = 4


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: each step is latency-bound and a second intra-op thread only adds synchronisation,
    # which on a loaded 2-core machine costs 10x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Captions(torch.utils.data.Dataset):
    """Images of CLASSES noisy colours, each captioned by two words that name its colour."""

    def __init__(self, size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(size) % CLASSES
        colours = torch.randn(CLASSES, 3, 1, 1, generator=g)
        self.images = colours[self.labels] + 0.3 * torch.randn(size, 3, IMAGE, IMAGE, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        c = int(self.labels[i])
        ids = torch.tensor([1, *[IMAGE_TOKEN] * 16, 10 + c, 20 + c, 2])
        labels = ids.clone()
        labels[:17] = -100
        return {"input_ids": ids, "labels": labels, "pixel_values": self.images[i]}


def train(model, tmp_path, optimizer=None, lr=1e-2):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4, learning_rate=lr, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Captions(),
                                   optimizers=(optimizer, None) if optimizer else (None, None))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 30
    return losses


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_stage_1_then_stage_2_with_lora_train_only_what_they_should(tmp_path):
    module = hf_tiny.fusion_projector("cross_attention")
    model = integration.fuse_llava(hf_tiny.llava(), module)
    model.train()

    stage1 = integration.set_training_stage(model, 1)
    trainable = {n for n, p in stage1.named_parameters() if p.requires_grad}
    assert trainable == {f"model.multi_modal_projector.{n}" for n, _ in module.named_parameters()}
    before = snapshot(stage1)
    losses = train(stage1, tmp_path / "s1", lr=3e-2)
    assert sum(losses[-5:]) < sum(losses[:5]) - 0.5
    assert changed(stage1, before) == trainable

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    stage2 = integration.set_training_stage(model, 2, lora=lora)
    assert lora.modules_to_save is None  # the caller's config is left alone
    fusion = integration.fusion_parameters(stage2)
    fusion_ids = {id(p) for p in fusion}
    rest = [p for p in stage2.parameters() if p.requires_grad and id(p) not in fusion_ids]
    optimizer = torch.optim.AdamW([{"params": fusion, "lr": 1e-3}, {"params": rest, "lr": 1e-2}])
    before = snapshot(stage2)
    losses = train(stage2, tmp_path / "s2", optimizer)
    assert sum(losses[-5:]) < sum(losses[:5]) - 0.5
    moved = changed(stage2, before)
    lora_names = {n for n in moved if ".lora_" in n}
    fusion_names = {n for n in moved if ".modules_to_save.default." in n}
    assert moved == lora_names | fusion_names
    assert lora_names
    assert all("language_model" in n for n in lora_names)
    assert len(fusion_names) == len(fusion) == len(list(module.parameters()))
    wrapped = {n for n, m in stage2.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped
    assert not any("multi_modal_projector" in n or "vision_tower" in n for n in wrapped)


def test_stage_2_without_lora_trains_the_llm_and_the_fusion_but_not_the_tower():
    model = integration.fuse_llava(hf_tiny.llava(), hf_tiny.fusion_projector("dci"))
    integration.set_training_stage(model, 2)
    trainable = {n.split(".")[1] if n.startswith("model.") else n.split(".")[0]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"language_model", "multi_modal_projector", "lm_head"}


def test_training_stage_arguments_are_checked():
    model = integration.fuse_llava(hf_tiny.llava(), hf_tiny.fusion_projector("dci"))
    with pytest.raises(ValueError, match="stage expected 1 or 2, got 3"):
        integration.set_training_stage(model, 3)
    with pytest.raises(ValueError, match="lora is for stage 2"):
        integration.set_training_stage(model, 1, lora=peft.LoraConfig())
    with pytest.raises(ValueError, match="holds no FusionProjector"):
        integration.fusion_parameters(hf_tiny.llava())
