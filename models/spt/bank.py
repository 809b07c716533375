"""The memory bank of prompts and the retriever that picks from it by the discrete prompt.

Paper (SPT, arXiv 2212.10929): memory prompts are retrieved from a bank "based on discrete
prompts". The details below are unverified against the paper (no official code); each decision
is written where it is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


class MemoryBank(nn.Module):
    """``S`` learnable memory prompts of ``L`` vectors each: ``M ∈ R^{S×L×d}``, plus keys ``K``.

    Keys: "learned" gives each prompt its own key vector; "mean" uses the mean of the prompt's
    vectors, so the key moves with the prompt (no extra parameters). Decision (unverified):
    learned keys by default, because with the mean the keys of all prompts start near zero and
    the retrieval stays near uniform for many steps.
    """

    def __init__(
        self, size: int, length: int, dim: int, keys: str = "learned", init_std: float = 0.5
    ) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(size, length, dim) * init_std)
        self.keys = nn.Parameter(torch.randn(size, dim) * init_std) if keys == "learned" else None

    @property
    def size(self) -> int:
        return self.prompts.shape[0]

    def key_matrix(self) -> torch.Tensor:
        return self.keys if self.keys is not None else self.prompts.mean(dim=1)


@dataclass
class Retrieval:
    """What one forward retrieved: the prompts to prepend and the weights α per example."""

    prompts: torch.Tensor  # (B, L_out, d)
    alpha: torch.Tensor  # (B, S) softmax weights (before top-k selection)
    indices: torch.Tensor | None  # (B, k) top-k indices (hard retrieval) or None

    def entropy(self) -> torch.Tensor:
        """Per-example entropy of α (log S at uniform retrieval)."""
        return -(self.alpha * self.alpha.clamp_min(1e-12).log()).sum(-1)


def template_query(embeds: torch.Tensor, prompt_token_mask: torch.Tensor) -> torch.Tensor:
    """``q = mean_pool(E(x_prompt))``: the mean input embedding over the template tokens only.

    The example's own tokens never enter the query (spec pitfall: otherwise retrieval turns into
    instance-level routing). A row with no template token has no query: a ValueError.
    """
    mask = prompt_token_mask.to(embeds.dtype).unsqueeze(-1)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        rows = (counts.squeeze(-1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"empty query: rows {rows} have no template token (prompt_token_mask is all zero)")
    return (embeds * mask).sum(dim=1) / counts


class PromptRetriever(nn.Module):
    """``α = softmax(q·Kᵀ/τ)`` over the bank, then a soft mixture or the top-k prompts.

    Decisions (unverified): the query is the frozen input embedding mean of the template,
    optionally through a learned linear projection (identity-initialised so that S=1 and the
    no-projection case coincide); scores are scaled by 1/sqrt(d) as in dot-product attention,
    then by 1/τ. Soft: ``Σ_s α_s M_s`` (length L). Top-k: the k best prompts concatenated in
    rank order (length k·L), each scaled by its renormalised weight so the keys get gradients.
    """

    def __init__(
        self,
        bank: MemoryBank,
        mode: str = "soft",
        top_k: int = 4,
        temperature: float = 1.0,
        projection: bool = False,
    ) -> None:
        super().__init__()
        if mode == "topk" and top_k > bank.size:
            raise ValueError(f"top_k={top_k} > bank_size={bank.size}")
        self.bank, self.mode, self.top_k, self.temperature = bank, mode, top_k, temperature
        dim = bank.prompts.shape[-1]
        self.proj = nn.Linear(dim, dim, bias=False) if projection else None
        if self.proj is not None:
            nn.init.eye_(self.proj.weight)

    @property
    def output_length(self) -> int:
        length = self.bank.prompts.shape[1]
        return length * (self.top_k if self.mode == "topk" else 1)

    def forward(self, query: torch.Tensor) -> Retrieval:
        if self.proj is not None:
            query = self.proj(query)
        keys = self.bank.key_matrix().to(query.dtype)
        scores = query @ keys.T / (math.sqrt(query.shape[-1]) * self.temperature)
        alpha = scores.softmax(dim=-1)
        prompts = self.bank.prompts.to(query.dtype)
        if self.mode == "soft":
            return Retrieval(torch.einsum("bs,sld->bld", alpha, prompts), alpha, None)
        weights, idx = alpha.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        chosen = prompts[idx] * (weights * self.top_k)[..., None, None]  # (B, k, L, d)
        return Retrieval(chosen.flatten(1, 2), alpha, idx)
