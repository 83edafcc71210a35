"""IGVA-style instruction-gated fusion end to end, offline, on random weights.

A small CLIP vision tower (random weights, CLIP-L's layout scaled down: 24 blocks, CLS token) is
tapped at the layers the fuser names, a small random BERT embeds the instructions, and the fuser
mixes four layer groups with weights chosen per instruction before the LLaVA projector.
Needs ``layerfuse[hf]``; nothing is downloaded.

    python examples/instruction_gated.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, CLIPVisionConfig, CLIPVisionModel

from layerfuse import FusionProjector, InstructionGatedFuser, LayerTap, Projector
from layerfuse.fusers.instruction_gated import gate_entropy_loss
from layerfuse.text import TextEmbedder

WORDS = ["what", "is", "the", "man", "holding", "describe", "image", "color", "of", "car", "how", "many", "people", "are", "there", "?", "."]


def tiny_text_encoder(folder: Path) -> TextEmbedder:
    """A random 2-block BERT with a WordPiece vocabulary written to ``folder``."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96)
    return TextEmbedder(BertModel(config), tokenizer)


def main() -> None:
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4,
        image_size=112, patch_size=14,
    )).eval()
    with tempfile.TemporaryDirectory() as folder:
        embedder = tiny_text_encoder(Path(folder))

        # IGVA's groups [[1..6], [7..12], [13..18], [19..24]] and base layer -2; zero_init_head starts
        # from the stage-1 uniform mean.
        fuser = InstructionGatedFuser(64, embedder.dim, gate_dim=64, zero_init_head=True)
        module = FusionProjector(fuser, Projector("mlp2x_gelu", fuser.out_dim, 96),
                                 layers=fuser.layers, tokens=fuser.tokens)
        print("fuser:", module.fuser.extra_repr(), "| layers:", module.layers)

        images = torch.randn(2, 3, 112, 112)
        questions = ["What is the man holding?", "How many people are there?"]
        with LayerTap(vision, module.layers, tokens=module.tokens) as tap, torch.no_grad():
            features = tap(images)
            text = embedder(questions)
        print(f"{len(features)} hidden states {tuple(features[0].shape)}, grid {features.grid}; text {tuple(text.shape)}")

        out = module.fuser.forward_with_weights(features, text=text)
        print("weights at init (uniform):", out.weights)
        visual_tokens = module.projector(out.output)
        print("visual tokens:", tuple(visual_tokens.shape))

        # a toy objective: the fused map should equal group 1's map for the first instruction and
        # group 4's for the second, so the gate has to tell the instructions apart. The maps of a
        # random tower differ little, so the error is scaled by their spread.
        means = fuser.group_means(features)[:, :, 1:]
        chosen = means[torch.arange(2), torch.tensor([0, 3])]
        spread = means.var(dim=1).mean()
        optimizer = torch.optim.AdamW(fuser.parameters(), lr=3e-3)
        for _ in range(30):
            out = fuser.forward_with_weights(features, text=text)
            error = (out.output[..., fuser.dim:] - chosen).square().mean() / spread
            loss = error + 0.02 * gate_entropy_loss(out.weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print("weights after 30 steps:", fuser.gate_weights(features, text=text).detach())


if __name__ == "__main__":
    main()
