"""A tiny CLIP, briefly pre-trained here on digit-pair (or triple) captions, for offline runs and tests.

Random CLIP weights make prompt learning meaningless (class names carry nothing), so the offline
set-up first trains a tiny CLIP contrastively on ``"a photo of digits <a> <b>."`` captions; the
prompt then has to recover, from a random context, what "a photo of digits" gave.
``python -m smile.models.pomp.tiny_clip OUT_DIR [--digits 3]`` writes it as a ``from_pretrained``
directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from smile.models.pomp.clip import CLIP_MEAN, CLIP_STD
from smile.models.pomp.digits import WORDS, digit_tuples, tuple_names

TEMPLATE = "a photo of digits {}."
EXTRA_WORDS = ("a", "photo", "of", "digits", "digit", "x")


def word_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges build each given word into one token."""
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz.,"))
    vocab = {
        t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])
    }
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_config(vocab_size: int, seed: int = 0) -> CLIPConfig:
    """hidden 32, 2 layers, 32 px images in 8 px patches (the spec's CPU test size)."""
    text = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def to_pixels(images, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> normalised float (n, 3, H, W)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def build_tiny_clip(
    out_dir: str | Path,
    steps: int = 400,
    batch: int = 100,
    seed: int = 0,
    arity: int = 2,
    per_class: int = 20,
) -> Path:
    """Train a tiny CLIP on digit-pair (``arity=2``) or triple captions (CLIP's symmetric
    InfoNCE, ``batch`` distinct classes per step) and save it."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer([*WORDS, *EXTRA_WORDS])
    model = CLIPModel(tiny_config(len(tokenizer)))
    images, labels = digit_tuples(per_class, "train", seed=seed, arity=arity)
    pixels = to_pixels(images)
    names = tuple_names(arity)
    texts = tokenizer([TEMPLATE.format(n) for n in names], padding=True, return_tensors="pt")
    n = len(names)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        # one image per class in each batch, so captions in a batch are distinct
        pick = torch.randint(per_class, (n,), generator=gen) + torch.arange(n) * per_class
        pick = pick[torch.randperm(n, generator=gen)[:batch]]
        out = model(
            input_ids=texts["input_ids"][labels[pick]],
            attention_mask=texts["attention_mask"][labels[pick]],
            pixel_values=pixels[pick],
        )
        target = torch.arange(len(pick))
        loss = (
            F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target)
        ) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--digits", type=int, default=2, choices=(2, 3), help="pairs or triples")
    parser.add_argument("--per-class", type=int, default=20, help="training images per class")
    args = parser.parse_args()
    print(build_tiny_clip(args.out_dir, steps=args.steps, arity=args.digits, per_class=args.per_class))


if __name__ == "__main__":
    main()
