"""Argument checks shared by the Triton and CUDA dispatch backends (clear errors before any launch)."""

from __future__ import annotations

import torch

_INT_DTYPES = (torch.int64, torch.int32)
_MAX_COPIES = 2**31 - 1  # kernels rank copies with 32-bit counters


def _same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: tensors must share one device, got {devices}")


def check_index_args(expert_ids: torch.Tensor, keep: torch.Tensor, num_experts: int) -> None:
    if expert_ids.dim() != 2 or expert_ids.dtype not in _INT_DTYPES:
        raise ValueError(
            f"dispatch_index: expert_ids must be a [T, k] int64/int32 tensor, got shape "
            f"{tuple(expert_ids.shape)} dtype {expert_ids.dtype}"
        )
    if keep.shape != expert_ids.shape or keep.dtype != torch.bool:
        raise ValueError(
            f"dispatch_index: keep must be a bool tensor shaped like expert_ids {tuple(expert_ids.shape)}, "
            f"got shape {tuple(keep.shape)} dtype {keep.dtype}"
        )
    _same_device("dispatch_index", expert_ids=expert_ids, keep=keep)
    if num_experts < 1:
        raise ValueError(f"dispatch_index: num_experts must be >= 1, got {num_experts}")
    if expert_ids.numel() > _MAX_COPIES:
        raise ValueError(f"dispatch_index: at most {_MAX_COPIES} copies (T*k), got {expert_ids.numel()}")


def check_gather_args(x: torch.Tensor, src: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"gather_rows: x must be [N, H], got shape {tuple(x.shape)}")
    if src.dim() != 1 or src.dtype not in _INT_DTYPES:
        raise ValueError(
            f"gather_rows: src must be a 1-D int64/int32 tensor, got shape {tuple(src.shape)} "
            f"dtype {src.dtype}"
        )
    _same_device("gather_rows", x=x, src=src)


def check_combine_args(y: torch.Tensor, dest: torch.Tensor, gates: torch.Tensor | None) -> None:
    if y.dim() != 2:
        raise ValueError(f"combine: y must be [R, H], got shape {tuple(y.shape)}")
    if dest.dim() != 2 or dest.dtype not in _INT_DTYPES:
        raise ValueError(
            f"combine: dest must be a [T, k] int64/int32 tensor, got shape {tuple(dest.shape)} "
            f"dtype {dest.dtype}"
        )
    if gates is not None:
        if gates.shape != dest.shape or not gates.is_floating_point():
            raise ValueError(
                f"combine: gates must be None or a float tensor shaped like dest {tuple(dest.shape)}, "
                f"got shape {tuple(gates.shape)} dtype {gates.dtype}"
            )
        _same_device("combine", y=y, dest=dest, gates=gates)
    else:
        _same_device("combine", y=y, dest=dest)


def check_index_stats(out_of_range: int, num_experts: int) -> None:
    """Host-side check on the counts a dispatch_index kernel produced."""
    if out_of_range:
        raise ValueError(
            f"dispatch_index: expert_ids of kept copies must lie in [0, {num_experts}); "
            f"{out_of_range} are out of range"
        )


def kept_total_mismatch(kept_total: int) -> str:
    return (
        f"dispatch_index: kept_total={kept_total} was given, but the keep mask keeps a different number "
        "of copies (pass kept_total only when every copy is kept)"
    )


def index_rows(stats: torch.Tensor, num_experts: int, kept_total: int | None) -> int:
    """Rows of the (dropless) permuted buffer, from a kernel's ``[kept total, out-of-range ids]``.

    With ``kept_total`` given: checked on the device, so the host never waits for the kernel (a
    failed check is a device-side assert). Otherwise read back and checked on the host.
    """
    if kept_total is not None:
        out_of_range = f"dispatch_index: expert_ids of kept copies must lie in [0, {num_experts})"
        torch._assert_async(stats[1] == 0, out_of_range)
        torch._assert_async(stats[0] == kept_total, kept_total_mismatch(kept_total))
        return kept_total
    kept, out_of_range = stats.tolist()
    check_index_stats(out_of_range, num_experts)
    return kept
