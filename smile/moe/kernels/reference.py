"""The pure-torch dispatch ops: the reference every fused kernel is tested against, and the CPU path.

The layout is fixed by three index tensors computed once per step by ``dispatch_index``:

* ``dest``   [T, k]  row of the permuted buffer holding copy j of token t, or -1 if dropped;
* ``src``    [R]     token whose copy sits in row r, or -1 for a padding row;
* ``counts`` [E]     rows used by each expert.

Within an expert, kept copies are laid out in flattened ``t * k + j`` order, so the layout is
deterministic. With a ``capacity`` C the buffer is ``E * C`` rows (expert e owns rows
``[e*C, (e+1)*C)``, unused rows are zero); without one it is dropless: ``sum(counts)`` rows.
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
        capacity: int | None,
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
        capacity: int | None,
        kept_total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, k = expert_ids.shape
        flat_ids = expert_ids.reshape(-1)
        flat_keep = keep.reshape(-1)
        # Dropped copies sort after every expert so kept ones stay contiguous per expert.
        key = torch.where(flat_keep, flat_ids, torch.full_like(flat_ids, num_experts))
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(flat_ids[flat_keep], minlength=num_experts)
        offsets = torch.cumsum(counts, 0) - counts
        kept = int(counts.sum())  # the reference reads it back, given or not, and checks the claim
        if kept_total is not None and kept != kept_total:
            raise ValueError(kept_total_mismatch(kept_total))
        kept_total = kept
        sorted_ids = key[order][:kept_total]
        rank_in_expert = torch.arange(kept_total, device=flat_ids.device) - offsets[sorted_ids]
        base = sorted_ids * capacity if capacity is not None else offsets[sorted_ids]
        rows = base + rank_in_expert
        if capacity is not None and kept_total and int(rank_in_expert.max()) >= capacity:
            raise ValueError(
                f"dispatch: an expert keeps more than capacity={capacity} tokens; "
                "the router's keep mask must enforce the capacity"
            )
        dest = torch.full((tokens * k,), -1, dtype=torch.long, device=flat_ids.device)
        dest[order[:kept_total]] = rows
        num_rows = num_experts * capacity if capacity is not None else kept_total
        src = torch.full((num_rows,), -1, dtype=torch.long, device=flat_ids.device)
        src[rows] = order[:kept_total] // k
        return dest.view(tokens, k), src, counts

    def gather_rows(self, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # a rank with no tokens still fills its padded buffer
            return x.new_zeros(src.numel(), x.shape[1])
        valid = src >= 0
        if bool(valid.all()):  # no padding rows (the layer never pads)
            return x.index_select(0, src)
        out = x.index_select(0, src.clamp(min=0))
        return out.masked_fill(~valid.unsqueeze(1), 0)  # true zeros, even next to inf/NaN rows

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
