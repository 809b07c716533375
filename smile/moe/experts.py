"""Expert FFNs of one rank, computed as one grouped GEMM per projection over local experts.

Input rows arrive grouped by local expert (``counts[i]`` rows for expert i, in order). Three
GEMM strategies, never a Python loop over experts:

* ``grouped_mm``: ``torch._grouped_mm`` on the variable-size groups directly (dropless, no
  padding computed); the group boundaries stay on the device, so no host synchronisation.
  Chosen automatically for bf16 on Hopper-class GPUs.
* ``triton``: the same dropless, sync-free grouped GEMM as Triton kernels
  (:mod:`smile.moe.kernels.grouped_gemm`), for fp32/bf16/fp16 on any GPU Triton supports (or on CPU
  under ``TRITON_INTERPRET=1``). Chosen automatically for 16-bit inputs on other GPUs (sm80+).
* ``bmm``: equal groups are a ``[e, M, d]`` view; variable groups are scattered into a
  ``[e, max_count, d]`` buffer first. The portable path (CPU, older GPUs, fp32, no triton).

The autograd is explicit (forward rows, input gradient rows, weight gradients as separate
steps) so the pipelined layer can take the weight gradients once over all chunks' rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smile.moe.config import ACTIVATIONS, GEMMS, check_choice

MIN_BMM_ROWS = 8  # see _Groups.batched
_EXPERT_ATTR = "_smile_expert"


def mark_expert_parameter(param: nn.Parameter) -> nn.Parameter:
    """Tag a parameter as expert-local: averaged only across its expert-data-parallel group."""
    setattr(param, _EXPERT_ATTR, True)
    return param


def is_expert_parameter(param: torch.Tensor) -> bool:
    return bool(getattr(param, _EXPERT_ATTR, False))


class ExpertFFN(nn.Module):
    """``num_local`` independent FFNs ``d_model -> d_ff -> d_model`` (no biases, as in Switch)."""

    def __init__(
        self,
        num_local: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        seed: int = 0,
        first_expert: int = 0,
        gemm: str = "auto",
    ) -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("gemm", gemm, GEMMS)
        if gemm == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            raise RuntimeError("gemm 'grouped_mm' needs torch._grouped_mm (torch >= 2.8)")
        if gemm == "triton" and not _triton_available():
            raise RuntimeError("gemm 'triton' needs triton (pip install 'smile-moe[triton]')")
        self.gemm = gemm
        self.num_local, self.d_model, self.d_ff = num_local, d_model, d_ff
        self.activation = activation
        gated = activation in ("swiglu", "geglu")
        self.w_in = mark_expert_parameter(
            nn.Parameter(torch.empty(num_local, d_model, d_ff * (2 if gated else 1)))
        )
        self.w_out = mark_expert_parameter(nn.Parameter(torch.empty(num_local, d_ff, d_model)))
        self.reset_parameters(seed, first_expert)

    @torch.no_grad()
    def reset_parameters(self, seed: int, first_expert: int) -> None:
        """Expert i's weights depend only on ``(seed, first_expert + i)``.

        So one seed gives the same global model whatever the expert-parallel layout.
        """
        for salt, (weight, fan_in) in enumerate(((self.w_in, self.d_model), (self.w_out, self.d_ff))):
            for i in range(self.num_local):
                gen = torch.Generator().manual_seed(seed + 1_000_003 * (first_expert + i) + salt)
                weight[i].copy_(torch.randn(weight.shape[1:], generator=gen) / math.sqrt(fan_in))

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu":
            return F.gelu(h)
        if self.activation == "relu":
            return F.relu(h)
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) if self.activation == "swiglu" else F.gelu(gate)) * up

    def resolve_gemm(self, x: torch.Tensor) -> str:
        """``auto``: grouped_mm for bf16 on sm90+ with 16-byte aligned rows; triton for bf16/fp16 on
        other sm80+ GPUs (masked tiles: any sizes); else bmm (CPU, fp32 where cuBLAS beats
        IEEE-fp32 Triton tiles, GPUs without 16-bit tensor-core support in Triton)."""
        if self.gemm != "auto":
            return self.gemm
        if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
            return "bmm"
        capability = torch.cuda.get_device_capability(x.device)
        if (
            hasattr(torch, "_grouped_mm")
            and x.dtype == torch.bfloat16
            and capability >= (9, 0)
            and self.d_model % 8 == 0
            and self.d_ff % 8 == 0
        ):
            return "grouped_mm"
        if capability >= (8, 0) and _triton_available():
            return "triton"
        return "bmm"

    def forward(self, x: torch.Tensor, counts: list[int] | torch.Tensor, run: Callable | None = None):
        """Rows of ``x`` [sum(counts), d] grouped by local expert -> same layout out.

        ``run(self, x, counts)``, when given, computes the result instead (the pipelined layer's
        schedule); it runs inside this module's call so module hooks (ZeRO-3 gathering the expert
        weights) still fire.
        """
        if run is not None:
            return run(self, x, counts)
        if len(counts) != self.num_local:
            raise ValueError(f"expected {self.num_local} expert counts, got {len(counts)}")
        return _ExpertFunction.apply(self, counts, self.w_in, self.w_out, x)

    # The three steps below are the layer's autograd, exposed so the pipelined layer
    # (smile.moe.pipeline) can run them per chunk and take the weight gradients once over all rows.

    def forward_rows(
        self, x: torch.Tensor, counts: list[int] | torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Expert outputs (no autograd) and what :meth:`backward_rows` needs."""
        gemm, groups = _GEMMS[self.resolve_gemm(x)], _Groups(counts, x.device)
        h = gemm.rows(x, self.w_in.to(x.dtype), groups)
        return gemm.rows(self._act(h), self.w_out.to(x.dtype), groups), (x, h)

    def backward_rows(
        self, grad: torch.Tensor, saved: tuple[torch.Tensor, ...], counts: list[int] | torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Input gradient, row by row, and the rows :meth:`weight_grads` contracts."""
        x, h = saved
        grad = grad.contiguous()
        gemm, groups = _GEMMS[self.resolve_gemm(x)], _Groups(counts, x.device)
        grad_a = gemm.rows(grad, self.w_out.to(x.dtype).transpose(1, 2), groups)
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            a = self._act(h)
            (grad_h,) = torch.autograd.grad(a, h, grad_a)
        grad_x = gemm.rows(grad_h, self.w_in.to(x.dtype).transpose(1, 2), groups)
        return grad_x, (x, grad_h, a.detach(), grad)

    def weight_grads(
        self, rows: tuple[torch.Tensor, ...], counts: list[int] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grad w_in, grad w_out)`` from :meth:`backward_rows`'s rows, grouped like the input."""
        x, grad_h, a, grad = rows
        gemm, groups = _GEMMS[self.resolve_gemm(x)], _Groups(counts, x.device)
        return (
            gemm.weights(x, grad_h, groups).to(self.w_in.dtype),
            gemm.weights(a, grad, groups).to(self.w_out.dtype),
        )


class _ExpertFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ffn, counts, w_in, w_out, x):  # type: ignore[override]
        y, saved = ffn.forward_rows(x, counts)
        ctx.ffn, ctx.counts = ffn, counts
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad_x, rows = ctx.ffn.backward_rows(grad, ctx.saved_tensors, ctx.counts)
        grad_w_in, grad_w_out = ctx.ffn.weight_grads(rows, ctx.counts)
        return None, None, grad_w_in, grad_w_out, grad_x


class _Groups:
    """Group sizes of row-grouped operands, on the host or the device as a strategy needs them."""

    def __init__(self, counts: list[int] | torch.Tensor, device: torch.device) -> None:
        self.counts, self.device = counts, device

    @functools.cached_property
    def host(self) -> list[int]:
        return self.counts.tolist() if torch.is_tensor(self.counts) else list(self.counts)

    @functools.cached_property
    def offsets(self) -> torch.Tensor:
        return torch.cumsum(torch.as_tensor(self.counts, device=self.device), 0, dtype=torch.int32)

    @functools.cached_property
    def batched(self) -> tuple[int, torch.Tensor | None]:
        """``(width, slot)``: groups padded to ``width`` rows each, row i at ``slot[i]`` of the
        flattened padding; ``slot`` is None when equal groups are already that layout.

        At least ``MIN_BMM_ROWS`` rows per GEMM: BLAS switches to matrix-vector kernels for a few
        rows, and a row's result must not depend on how many rows share the call (chunked layers).
        """
        counts = self.host
        if len(set(counts)) == 1 and counts[0] >= MIN_BMM_ROWS:
            return counts[0], None
        width = max(max(counts), MIN_BMM_ROWS)
        counts_t = torch.tensor(counts, device=self.device)
        starts = torch.cumsum(counts_t, 0) - counts_t
        expert = torch.repeat_interleave(torch.arange(len(counts), device=self.device), counts_t)
        rows = torch.arange(expert.numel(), device=self.device)
        return width, expert * width + rows - starts[expert]


class _Gemm:
    """A grouped GEMM strategy: ``rows`` computes ``x_e @ w[e]`` for each group e of rows,
    ``weights`` the weight gradient ``x_e^T @ grad_e``; empty operands give zeros."""

    def rows(self, x: torch.Tensor, w: torch.Tensor, groups: _Groups) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(0, w.shape[2])
        return self._rows(x, w, groups)

    def weights(self, x: torch.Tensor, grad: torch.Tensor, groups: _Groups) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(len(groups.counts), x.shape[1], grad.shape[1])
        return self._weights(x, grad, groups)

    def _rows(self, x: torch.Tensor, w: torch.Tensor, groups: _Groups) -> torch.Tensor:
        raise NotImplementedError

    def _weights(self, x: torch.Tensor, grad: torch.Tensor, groups: _Groups) -> torch.Tensor:
        raise NotImplementedError


class _BmmGemm(_Gemm):
    """Groups padded to one width (:attr:`_Groups.batched`) and batched."""

    def _rows(self, x, w, groups):
        out = torch.bmm(self._pad(x, groups), w).reshape(-1, w.shape[2])
        slot = groups.batched[1]
        return out if slot is None else out.index_select(0, slot)

    def _weights(self, x, grad, groups):
        return torch.bmm(self._pad(x, groups).transpose(1, 2), self._pad(grad, groups))

    @staticmethod
    def _pad(x: torch.Tensor, groups: _Groups) -> torch.Tensor:
        width, slot = groups.batched
        if slot is None:
            return x.view(len(groups.host), width, -1)
        padded = x.new_zeros(len(groups.host) * width, x.shape[1]).index_copy(0, slot, x)
        return padded.view(-1, width, x.shape[1])


class _TorchGroupedGemm(_Gemm):
    """``torch._grouped_mm`` on the variable groups; offsets stay on the device."""

    def _rows(self, x, w, groups):
        return torch._grouped_mm(x.contiguous(), w, offs=groups.offsets)

    def _weights(self, x, grad, groups):
        return torch._grouped_mm(x.t(), grad.contiguous(), offs=groups.offsets)


class _TritonGemm(_Gemm):
    """The Triton kernels of :mod:`smile.moe.kernels.grouped_gemm`; offsets stay on the device."""

    def _rows(self, x, w, groups):
        from smile.moe.kernels.grouped_gemm import grouped_rows

        return grouped_rows(x, w, groups.offsets)

    def _weights(self, x, grad, groups):
        from smile.moe.kernels.grouped_gemm import grouped_weight_grad

        return grouped_weight_grad(x, grad, groups.offsets)


_GEMMS: dict[str, _Gemm] = {"bmm": _BmmGemm(), "grouped_mm": _TorchGroupedGemm(), "triton": _TritonGemm()}


@functools.cache
def _triton_available() -> bool:
    """Whether the Triton grouped GEMM imports (tried on first use only: ``import smile`` needs no triton)."""
    try:
        import smile.moe.kernels.grouped_gemm  # noqa: F401
    except ImportError:
        return False
    return True
