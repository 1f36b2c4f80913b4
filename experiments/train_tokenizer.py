"""Train the byte-level BPE of the paired-shapes captions (prob_jepa/data/multimodal.py) and save it as JSON.

    python experiments/train_tokenizer.py                       # rewrites prob_jepa/data/assets/shapes_bpe.json
    python experiments/train_tokenizer.py --out /tmp/bpe.json --vocab-size 1024

The captions are those of :class:`PairedShapes` scenes drawn at ``--seed`` as ``data=paired_shapes`` draws them
(its ``data.scene``); ``<pad>`` is token 0.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from prob_jepa.config import compose_config
from prob_jepa.data.multimodal import PAD_TOKEN, TOKENIZER_PATH, captions, draw_paired_scenes
from prob_jepa.data.shapes import Scene

CONF = Path(__file__).resolve().parent / "conf"


def train(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (``<pad>`` = 0, then the 256 bytes, then merges) fit to ``texts``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TOKENIZER_PATH)
    parser.add_argument("--captions", type=int, default=20_000, help="captions to train on")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    scene = Scene.from_config(compose_config(CONF, ["data=paired_shapes"]).data.scene)
    texts = captions(draw_paired_scenes(args.captions, g, scene), g, scene)
    tokenizer = train(texts, args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out))
    longest = max(len(e.ids) for e in tokenizer.encode_batch(texts))
    print(f"{args.out}: {tokenizer.get_vocab_size()} tokens; the longest of {len(texts)} captions is {longest} tokens")


if __name__ == "__main__":
    main()
