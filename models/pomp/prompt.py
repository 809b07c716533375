"""CoOp-style prompts ``[SOS] v_1..v_M <name> . [EOS]`` with one context shared by every class.

Only ``ctx`` is a parameter. Class prompts are kept as token ids (a non-persistent buffer), so a
checkpoint holds M x d numbers whatever the number of classes; embeddings of the selected classes
are looked up in CLIP's frozen token table at each step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

POSITIONS = ("end", "middle", "front")


class PromptLearner(nn.Module):
    """Shared soft context (init N(0, ctx_init_std)) and the tokenised class prompts."""

    def __init__(
        self,
        classnames: list[str],
        tokenizer: PreTrainedTokenizerBase,
        embed_dim: int,
        context_length: int,
        n_ctx: int = 4,
        ctx_init_std: float = 0.02,
        class_token_position: str = "end",
    ) -> None:
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ValueError(
                f"class_token_position={class_token_position!r} is not allowed; "
                "allowed values: end, middle, front"
            )
        self.n_ctx, self.classnames = n_ctx, list(classnames)
        self.ctx = nn.Parameter(torch.randn(n_ctx, embed_dim) * ctx_init_std)
        ids, ctx_mask, eos = tokenize_prompts(
            classnames, tokenizer, n_ctx, context_length, class_token_position
        )
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("ctx_mask", ctx_mask, persistent=False)
        self.register_buffer("eos_index", eos, persistent=False)

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def embed(self, class_ids: Tensor, token_embedding: nn.Embedding) -> Tensor:
        """Token embeddings of the selected prompts with the context put in its slots."""
        embeds = token_embedding(self.token_ids[class_ids])
        ctx = self.ctx.to(embeds.dtype).expand(len(class_ids), -1, -1)
        return embeds.masked_scatter(self.ctx_mask[class_ids][..., None], ctx)


def tokenize_prompts(
    classnames: list[str],
    tokenizer: PreTrainedTokenizerBase,
    n_ctx: int,
    context_length: int,
    position: str = "end",
) -> tuple[Tensor, Tensor, Tensor]:
    """(token ids (N, L), context slots (N, L), EOS index (N,)), padded to the longest prompt
    (causal attention + EOS pooling make longer padding irrelevant). A prompt longer than CLIP's
    context is a ValueError naming the class."""
    sos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    period = tokenizer(".", add_special_tokens=False)["input_ids"]
    names = tokenizer(list(classnames), add_special_tokens=False)["input_ids"]
    rows, slots = [], []
    for name, tokens in zip(classnames, names):
        if n_ctx + len(tokens) + 3 > context_length:
            raise ValueError(
                f"class {name!r}: n_ctx={n_ctx} + {len(tokens)} name tokens + 3 exceeds CLIP's context "
                f"length {context_length}; shorten the name or lower n_ctx"
            )
        half = n_ctx // 2 if position == "middle" else (0 if position == "front" else n_ctx)
        parts = [([sos], False), ([0] * half, True), (tokens, False), ([0] * (n_ctx - half), True)]
        parts += [(period, False), ([eos], False)]
        rows.append([t for toks, _ in parts for t in toks])
        slots.append([is_ctx for toks, is_ctx in parts for _ in toks])
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([s + [False] * (length - len(s)) for s in slots])
    eos_index = torch.tensor([len(r) - 1 for r in rows])
    return ids, mask, eos_index
