"""Dispatch ops from the compiled CUDA extension ``smile.moe._C`` (built by setup.py where nvcc exists).

Importing this module raises ImportError when the extension is missing, which smile.moe.kernels
logs once and answers by falling back to the Triton or torch backend.
"""

from __future__ import annotations

import torch

from smile.moe.kernels.common import check_combine_args, check_gather_args, check_index_args, index_rows

try:
    from smile.moe import _C
except ImportError as err:
    raise ImportError(
        "smile.moe._C (the CUDA dispatch extension) is not built; build it where nvcc and a CUDA build of "
        "torch exist with `python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`"
        f" ({err})"
    ) from err


def _check_cuda(op: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"cuda dispatch backend: {op} needs CUDA tensors, got device {t.device}")


class CudaBackend:
    """Dispatch ops as hand-written CUDA kernels (same layout and results as the torch reference)."""

    name = "cuda"

    def dispatch_index(
        self,
        expert_ids: torch.Tensor,
        keep: torch.Tensor,
        num_experts: int,
        kept_total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_index_args(expert_ids, keep, num_experts)
        _check_cuda("dispatch_index", expert_ids)
        tokens, k = expert_ids.shape
        expert, rank, offsets, base, counts, stats = _C.index_count(expert_ids, keep, num_experts)
        num_rows = index_rows(stats, num_experts, kept_total)
        if k == 0:
            empty = torch.empty((tokens, 0), dtype=torch.long, device=expert_ids.device)
            return empty, torch.empty(num_rows, dtype=torch.long, device=expert_ids.device), counts
        dest, src = _C.index_write(expert, rank, offsets, base, num_rows, k)
        return dest.view(tokens, k), src, counts

    def gather_rows(self, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        check_gather_args(x, src)
        _check_cuda("gather_rows", x)
        return _C.gather_rows(x, src)

    def combine(self, y: torch.Tensor, dest: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        check_combine_args(y, dest, gates)
        _check_cuda("combine", y)
        return _C.combine(y, dest, gates)
