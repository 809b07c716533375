"""The pure-torch dispatch ops: the reference every fused kernel is tested against, and the CPU path.

The layout is fixed by three index tensors computed once per step by ``dispatch_index``:

* ``dest``   [T, k]  row of the permuted buffer holding copy j of token t, or -1 if dropped;
* ``src``    [R]     token whose copy sits in row r;
* ``counts`` [E]     rows used by each expert.

The buffer is dropless: ``R = sum(counts)`` rows holding only the kept copies, grouped by expert
(expert e owns the ``counts[e]`` rows after those of experts ``0 .. e-1``), with no padding rows.
Within an expert, kept copies are laid out in flattened ``t * k + j`` order, so the layout is
deterministic. A capacity, if any, is enforced by the router's keep mask before the index is built.
"""

from __future__ import annotations

from typing import Protocol

import torch

from smile.moe.kernels.common import kept_total_mismatch


class DispatchBackend(Protocol):
    """The three ops a backend provides (forward only; autograd is wired here)."""

    def dispatch_index(
        self,
        expert_ids: torch.Tensor,
        keep: torch.Tensor,
        num_experts: int,
        kept_total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``kept_total``: the number of kept copies when the caller knows it (dropless: T * k).
        The fused backends then build a dropless index without waiting for its size on the host
        (they check the claim on the device); the reference reads the size back and checks it."""
        ...

    def gather_rows(self, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor: ...

    def combine(self, y: torch.Tensor, dest: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor: ...


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the input's own precision when it is wider."""
    return torch.promote_types(dtype, torch.float32)


class TorchBackend:
    """Reference implementation: argsort + bincount + index_select / gather."""

    name = "torch"

    def dispatch_index(
        self,
        expert_ids: torch.Tensor,
        keep: torch.Tensor,
        num_experts: int,
        kept_total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, k = expert_ids.shape
        flat_ids = expert_ids.reshape(-1)
        flat_keep = keep.reshape(-1)
        # Dropped copies sort after every expert so kept ones stay contiguous per expert.
        key = torch.where(flat_keep, flat_ids, torch.full_like(flat_ids, num_experts))
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(flat_ids[flat_keep], minlength=num_experts)
        kept = int(counts.sum())  # the reference reads it back, given or not, and checks the claim
        if kept_total is not None and kept != kept_total:
            raise ValueError(kept_total_mismatch(kept_total))
        # Kept copies come first in ``order``, grouped by expert: the i-th of them takes row i.
        kept_order = order[:kept]
        dest = torch.full((tokens * k,), -1, dtype=torch.long, device=flat_ids.device)
        dest[kept_order] = torch.arange(kept, device=flat_ids.device)
        src = kept_order // k
        return dest.view(tokens, k), src, counts

    def gather_rows(self, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, src)  # every row holds a kept copy (no padding); empty src: [0, H]

    def combine(self, y: torch.Tensor, dest: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        if y.shape[0] == 0:  # every copy dropped or sent nowhere
            return y.new_zeros(dest.shape[0], y.shape[1])
        valid = dest >= 0
        rows = y.index_select(0, dest.clamp(min=0).reshape(-1)).view(*dest.shape, y.shape[1])
        if not bool(valid.all()):  # dropped copies: true zeros, even next to inf/NaN rows
            rows = rows.masked_fill(~valid.unsqueeze(-1), 0)
        acc = accumulation_dtype(y.dtype)
        weight = valid.to(acc)
        if gates is not None:
            weight = weight * gates.to(acc)
        out = torch.einsum("tkh,tk->th", rows.to(acc), weight)
        return out.to(y.dtype)
