import sys

import pytest
import torch

from layerfuse import InstructionGatedFuser
from layerfuse.text import TextEmbedder, embed_texts, mean_pool

transformers = pytest.importorskip("transformers")

WORDS = ["what", "is", "the", "man", "holding", "describe", "image", "color", "of", "car", "?", "."]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer BERT and a WordPiece tokenizer built from a small vocab file (no download)."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)
    assert tokenizer.unk_token_id not in tokenizer("what is the man holding?")["input_ids"]
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    return model, tokenizer, folder


def test_embeddings_are_masked_means_with_unit_norm(tiny_encoder):
    model, tokenizer, _ = tiny_encoder
    texts = ["What is the man holding?", "Describe the image.", "color"]
    emb = embed_texts(texts, model, tokenizer)
    assert emb.shape == (3, 16)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # padding does not leak into a shorter text's embedding
    alone = embed_texts(["color"], model, tokenizer)
    torch.testing.assert_close(emb[2:], alone, rtol=1e-5, atol=1e-6)
    batch = tokenizer(["Describe the image."], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    expected = torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)
    torch.testing.assert_close(emb[1:2], expected, rtol=1e-5, atol=1e-6)
    raw = embed_texts(texts, model, tokenizer, normalize=False, batch_size=2)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), emb, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))


def test_text_embedder_from_module_and_from_path(tiny_encoder):
    model, tokenizer, folder = tiny_encoder
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    from_module = TextEmbedder(model, tokenizer)
    from_path = TextEmbedder(folder)
    assert from_path.dim == 16
    assert not any(p.requires_grad for p in from_path.model.parameters())
    texts = ["what is the car color?"]
    torch.testing.assert_close(from_path(texts), from_module(texts))
    assert repr(from_module) == "TextEmbedder(BertModel, dim=16, normalize=True, max_length=None)"


def test_embeddings_feed_the_gated_fuser(tiny_encoder):
    model, tokenizer, _ = tiny_encoder
    embedder = TextEmbedder(model, tokenizer)
    fuser = InstructionGatedFuser(8, embedder.dim, groups=[[1, 2], [3, 4]], gate_dim=8, num_blocks=1)
    feats = [torch.randn(2, 5, 8) for _ in fuser.layers]
    text = embedder(["what is the man holding?", "describe the image."])
    out = fuser.forward_with_weights(feats, text=text)
    assert out.output.shape == (2, 4, 16)
    assert not torch.allclose(out.weights[0], out.weights[1])


def test_bad_inputs(tiny_encoder):
    model, tokenizer, _ = tiny_encoder
    with pytest.raises(TypeError, match=r"embed_texts: texts expected a sequence of str, got 'what'"):
        embed_texts("what", model, tokenizer)
    with pytest.raises(ValueError, match=r"embed_texts: texts expected at least one text, got an empty sequence"):
        embed_texts([], model, tokenizer)
    with pytest.raises(ValueError, match=r"embed_texts: batch_size expected a positive int, got 0"):
        embed_texts(["what"], model, tokenizer, batch_size=0)
    with pytest.raises(ValueError, match=r"TextEmbedder: tokenizer is required when model is a module"):
        TextEmbedder(model)
    with pytest.raises(TypeError, match=r"TextEmbedder: model expected an nn.Module or a path, got int"):
        TextEmbedder(3, tokenizer)


def test_mean_pool():
    hidden = torch.arange(12.0).reshape(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[1.5, 2.5, 3.5]]))
    assert mean_pool(hidden.to(torch.bfloat16), mask).dtype == torch.float32
    with pytest.raises(ValueError, match=r"mean_pool: attention_mask has a row without any token"):
        mean_pool(hidden, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"mean_pool: expected hidden \(B, L, E\) and attention_mask \(B, L\), "
                                         r"got \(1, 4, 3\) and \(1, 3\)"):
        mean_pool(hidden, torch.ones(1, 3))


def test_missing_transformers_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"TextEmbedder with a model path needs the optional dependency "
                                          r"'transformers'.*pip install '\.\[hf\]'"):
        TextEmbedder(tmp_path)
