"""Expert FFNs of one rank, computed as one grouped GEMM per projection over local experts.

Input rows arrive grouped by local expert (``counts[i]`` rows for expert i, in order). Two
GEMM strategies, never a Python loop over experts:

* ``grouped_mm``: ``torch._grouped_mm`` on the variable-size groups directly (dropless, no
  padding computed); the group boundaries stay on the device, so no host synchronisation.
  Chosen automatically for bf16 on Hopper-class GPUs.
* ``bmm``: equal groups (capacity-padded dispatch) are a ``[e, M, d]`` view; variable groups
  are scattered into a ``[e, max_count, d]`` buffer first. The portable path (CPU, older GPUs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("gelu", "relu", "swiglu", "geglu")
GEMMS = ("auto", "grouped_mm", "bmm")
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
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} unknown; allowed: {', '.join(ACTIVATIONS)}")
        if gemm not in GEMMS:
            raise ValueError(f"gemm {gemm!r} unknown; allowed: {', '.join(GEMMS)}")
        if gemm == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            raise RuntimeError("gemm 'grouped_mm' needs torch._grouped_mm (torch >= 2.8)")
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

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` is ``[e, M, d]`` (one group per local expert)."""
        return torch.bmm(self._act(torch.bmm(x, self.w_in.to(x.dtype))), self.w_out.to(x.dtype))

    def resolve_gemm(self, x: torch.Tensor) -> str:
        """``auto``: grouped_mm for bf16 on sm90+ with 16-byte aligned rows, else bmm."""
        if self.gemm != "auto":
            return self.gemm
        if (
            hasattr(torch, "_grouped_mm")
            and x.is_cuda
            and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and self.d_model % 8 == 0
            and self.d_ff % 8 == 0
        ):
            return "grouped_mm"
        return "bmm"

    def forward(self, x: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` [sum(counts), d] grouped by local expert -> same layout out."""
        if len(counts) != self.num_local:
            raise ValueError(f"expected {self.num_local} expert counts, got {len(counts)}")
        if x.shape[0] == 0:
            # Keep the graph connected so every rank's backward touches the expert weights.
            return x + 0.0 * (self.w_in.sum() + self.w_out.sum())
        if self.resolve_gemm(x) == "grouped_mm":
            return self._forward_grouped_mm(x, counts)
        return self._forward_bmm(x, counts.tolist() if torch.is_tensor(counts) else counts)

    def _forward_grouped_mm(self, x: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
        counts_t = torch.as_tensor(counts, device=x.device)
        offsets = torch.cumsum(counts_t, 0, dtype=torch.int32)
        h = torch._grouped_mm(x.contiguous(), self.w_in.to(x.dtype), offs=offsets)
        out = torch._grouped_mm(self._act(h).contiguous(), self.w_out.to(x.dtype), offs=offsets)
        return _ContiguousGrad.apply(out)

    def _forward_bmm(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if len(set(counts)) == 1:
            return self.forward_grouped(x.view(self.num_local, counts[0], -1)).reshape(x.shape)
        width = max(counts)
        counts_t = torch.tensor(counts, device=x.device)
        starts = torch.cumsum(counts_t, 0) - counts_t
        expert = torch.repeat_interleave(torch.arange(self.num_local, device=x.device), counts_t)
        slot = expert * width + torch.arange(x.shape[0], device=x.device) - starts[expert]
        padded = x.new_zeros(self.num_local * width, x.shape[1]).index_copy(0, slot, x)
        out = self.forward_grouped(padded.view(self.num_local, width, -1))
        return out.reshape(self.num_local * width, -1).index_select(0, slot)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense.

    ``torch._grouped_mm``'s backward rejects broadcast (stride-0) gradients such as the one
    ``out.sum()`` produces.
    """

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.contiguous()
