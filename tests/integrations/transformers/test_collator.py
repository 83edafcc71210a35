import pytest
import torch

import hf_tiny
from hf_tiny import IMAGE, IMAGE_TOKEN, TEXT_DIM

transformers = pytest.importorskip("transformers")
integration = pytest.importorskip("layerfuse.integrations.transformers")
from layerfuse.text import TextEmbedder  # noqa: E402

WORDS = ["what", "is", "the", "man", "holding", "?", "describe", "image", "."]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=TEXT_DIM, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16, max_position_embeddings=32)
    return TextEmbedder(transformers.BertModel(config), tokenizer)


def test_user_turn_reads_both_conversation_formats():
    llava = [{"from": "human", "value": "<image>\nWhat is the man holding?"}, {"from": "gpt", "value": "A cup."}]
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    assert integration.user_turn(llava) == "What is the man holding?"
    assert integration.user_turn(chat) == "Describe the image."
    assert integration.user_turn([{"from": "gpt", "value": "hi"}]) == ""


def sample(i, **text):
    ids = torch.tensor([1, *[IMAGE_TOKEN] * 16, 10 + i, 2])
    return {"input_ids": ids, "labels": ids, "pixel_values": torch.randn(3, IMAGE, IMAGE), **text}


def test_collator_adds_instruction_embeds_that_drive_the_igva_model(embedder):
    collate = integration.InstructionCollator(embedder, transformers.default_data_collator)
    batch = collate([
        sample(0, instruction="what is the man holding?"),
        sample(1, conversations=[{"from": "human", "value": "<image>\ndescribe the image."}]),
        sample(2, instruction=""),
    ])
    assert "instruction" not in batch
    assert "conversations" not in batch
    expected = embedder(["what is the man holding?", "describe the image."])
    assert torch.equal(batch["instruction_embeds"][:2], expected)
    assert torch.equal(batch["instruction_embeds"][2], torch.zeros(TEXT_DIM))  # no instruction: zero row
    model = integration.fuse_llava(hf_tiny.llava(), hf_tiny.fusion_projector("igva"))
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_collator_refuses_a_sample_without_text(embedder):
    collate = integration.InstructionCollator(embedder, transformers.default_data_collator)
    with pytest.raises(ValueError, match="sample 0 has neither 'instruction' nor 'conversations'"):
        collate([sample(0)])
