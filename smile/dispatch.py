"""Token permute (rows grouped by expert) and un-permute + weighted combine, with autograd.

The layout is fixed by three index tensors computed once per step by :func:`dispatch_index`:

* ``dest``   [T, k]  row of the permuted buffer holding copy j of token t, or -1 if dropped;
* ``src``    [R]     token whose copy sits in row r, or -1 for a padding row;
* ``counts`` [E]     rows used by each expert.

Within an expert, kept copies are laid out in flattened ``t * k + j`` order, so the layout is
deterministic. With a ``capacity`` C the buffer is ``E * C`` rows (expert e owns rows
``[e*C, (e+1)*C)``, unused rows are zero); without one it is dropless: ``sum(counts)`` rows.

Every op has a pure-torch reference here; the Triton (smile.kernels) and CUDA (smile._C)
backends implement the same functions and are checked against these on random inputs.
"""

from __future__ import annotations

import functools
import logging
from typing import Protocol

import torch

from smile.kernels.common import kept_total_mismatch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "cuda")


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


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
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
        acc = _accumulation_dtype(y.dtype)
        weight = valid.to(acc)
        if gates is not None:
            weight = weight * gates.to(acc)
        out = torch.einsum("tkh,tk->th", rows.to(acc), weight)
        return out.to(y.dtype)


_TORCH = TorchBackend()


@functools.cache
def _load_backend(name: str) -> DispatchBackend | None:
    """The backend, or None (logged once: the answer is cached, the layer asks every step)."""
    if name == "torch":
        return _TORCH
    try:
        if name == "triton":
            from smile.kernels import TritonBackend

            return TritonBackend()
        if name == "cuda":
            from smile.kernels.cuda import CudaBackend

            return CudaBackend()
    except (ImportError, RuntimeError, OSError) as err:
        log.warning("smile dispatch: %s backend unavailable (%s); falling back", name, err)
    return None


def get_backend(name: str = "auto", device: torch.device | None = None) -> DispatchBackend:
    """Pick a backend: ``auto`` prefers cuda > triton > torch for CUDA tensors, torch on CPU."""
    if name not in BACKENDS:
        raise ValueError(f"dispatch backend {name!r} unknown; allowed: {', '.join(BACKENDS)}")
    if name != "auto":
        backend = _load_backend(name)
        if backend is None:
            raise RuntimeError(f"dispatch backend {name!r} requested but not available")
        return backend
    if device is not None and device.type == "cuda":
        for candidate in ("cuda", "triton"):
            backend = _load_backend(candidate)
            if backend is not None:
                return backend
    return _TORCH


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, dest, backend):  # type: ignore[override]
        ctx.save_for_backward(dest)
        ctx.backend = backend
        return backend.gather_rows(x, src)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (dest,) = ctx.saved_tensors
        return ctx.backend.combine(grad_out.contiguous(), dest, None), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gates, dest, src, backend):  # type: ignore[override]
        ctx.save_for_backward(y, gates, dest, src)
        ctx.backend = backend
        return backend.combine(y, dest, gates)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        y, gates, dest, src = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_y = grad_gates = None
        if ctx.needs_input_grad[0]:
            # Row r of y fed token src[r] with weight gates[t, j]: a gather, no atomics.
            row_gate = _row_gates(gates, dest, src)
            grad_y = ctx.backend.gather_rows(grad_out, src) * row_gate.unsqueeze(1).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            rows = ctx.backend.combine(y, dest.reshape(-1, 1), None).view(*dest.shape, y.shape[1])
            acc = _accumulation_dtype(y.dtype)
            grad_gates = torch.einsum("tkh,th->tk", rows.to(acc), grad_out.to(acc)).to(gates.dtype)
        return grad_y, grad_gates, None, None, None


def _row_gates(gates: torch.Tensor, dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Gate of the copy held by each permuted row (0 for padding rows).

    A gather (row r holds the copy j of token src[r] with dest[src[r], j] == r): no boolean mask,
    whose size a GPU would have to send back to the host, and no duplicate scatter indices.
    """
    token = src.clamp(min=0)
    row = torch.arange(src.numel(), device=src.device).unsqueeze(1)
    return (gates.index_select(0, token) * (dest.index_select(0, token) == row)).sum(1)


def permute(x: torch.Tensor, src: torch.Tensor, dest: torch.Tensor, backend: DispatchBackend) -> torch.Tensor:
    """Rows of ``x`` laid out by expert (``src`` order); gradient sums each token's copies."""
    return _Permute.apply(x, src, dest, backend)


def unpermute_combine(
    y: torch.Tensor, gates: torch.Tensor, dest: torch.Tensor, src: torch.Tensor, backend: DispatchBackend
) -> torch.Tensor:
    """``out[t] = sum_j gates[t, j] * y[dest[t, j]]`` in fp32 (dropped copies contribute 0)."""
    return _Combine.apply(y, gates, dest, src, backend)
