"""Triton grouped GEMM over variable-size row groups: ``out[rows of e] = x[rows of e] @ w[e]``.

The dropless expert FFN path for GPUs where ``torch._grouped_mm`` is not available (fp16, pre-Hopper).
Group boundaries (``offsets``, cumulative row ends) stay on the device: the forward launches
``cdiv(N, BLOCK_R) + E`` row tiles (an upper bound on the tiles of all groups together) and every
program finds its group by a loop over the E offsets, so neither the forward nor the backward
synchronises with the host. Accumulation is fp32; outputs have the input dtype.

Offsets must be non-decreasing with ``offsets[-1] <= N``; rows past ``offsets[-1]`` get zeros. Other
offsets give unspecified results but never touch memory outside the tensors (every bound is clamped).

Importing this module needs triton. Under ``TRITON_INTERPRET=1`` (set before triton is imported) the
kernels also run on CPU tensors, which is how the CPU test suite checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _grouped_mm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    offsets_ptr,
    N,
    K,
    M,
    E,
    stride_an,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bm,
    stride_cn,
    stride_cm,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_R: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """c[rows of e, cols] = a[rows of e, :] @ b[e, :, cols] for one (row tile, column tile)."""
    # Row tiles are visited GROUP_R at a time across all column tiles, so neighbours share operands in L2.
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(N, BLOCK_R) + E
    per_group = GROUP_R * tl.cdiv(M, BLOCK_C)
    first = (pid // per_group) * GROUP_R
    size = tl.minimum(row_tiles - first, GROUP_R)
    tile = first + (pid % per_group) % size
    col_tile = (pid % per_group) // size

    # Which group owns this row tile: groups are clamped to [previous end, N], so they never overlap.
    expert = -1
    start = 0
    end = 0
    seen = 0
    prev = 0
    for e in range(E):
        stop = tl.minimum(tl.maximum(tl.load(offsets_ptr + e), prev), N)
        tiles = tl.cdiv(stop - prev, BLOCK_R)
        hit = (tile >= seen) & (tile < seen + tiles)
        expert = tl.where(hit, e, expert)
        start = tl.where(hit, prev + (tile - seen) * BLOCK_R, start)
        end = tl.where(hit, stop, end)
        seen += tiles
        prev = stop
    if expert < 0:
        return

    rows = (start + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (col_tile * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    row_ok = rows < end
    col_ok = cols < M
    a_ptrs = a_ptr + rows[:, None] * stride_an + ks[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bm
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rows[:, None] * stride_cn + cols[None, :] * stride_cm
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,
    g_ptr,
    c_ptr,
    offsets_ptr,
    N,
    K,
    M,
    stride_an,
    stride_ak,
    stride_gn,
    stride_gm,
    stride_ce,
    stride_ck,
    stride_cm,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """c[e, ks, cols] = a[rows of e, ks]^T @ g[rows of e, cols]: zeros for an empty group."""
    expert = tl.program_id(0)
    ks = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    cols = (tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    k_ok = ks < K
    col_ok = cols < M
    # The same clamped bounds as the forward kernel.
    start = 0
    stop = 0
    for e in range(expert + 1):
        start = stop
        stop = tl.minimum(tl.maximum(tl.load(offsets_ptr + e), stop), N)

    lanes = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    for r0 in range(start, stop, BLOCK_R):
        rows = (r0 + lanes).to(tl.int64)
        row_ok = rows < stop
        a = tl.load(
            a_ptr + rows[:, None] * stride_an + ks[None, :] * stride_ak,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        g = tl.load(
            g_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_gm,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if DOT_FP32:
            a, g = a.to(tl.float32), g.to(tl.float32)
        acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
    c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + ks[:, None] * stride_ck + cols[None, :] * stride_cm
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


INTERPRETED = type(_grouped_mm_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class _Tiles:
    rows: int  # forward: rows of a group per program; weight gradient: rows reduced per step
    cols: int
    inner: int  # forward: reduction step over K; weight gradient: K rows of the gradient tile
    warps: int
    stages: int


# Tensor-core tiles for 16-bit inputs; smaller fp32 tiles keep shared memory per stage the same.
# The interpreter runs every program in Python: the smallest tiles tl.dot accepts keep tests fast.
_TILES = {2: _Tiles(128, 128, 64, 8, 3), 4: _Tiles(64, 64, 32, 4, 3)}
_WGRAD_TILES = {2: _Tiles(64, 128, 128, 8, 3), 4: _Tiles(32, 64, 64, 4, 3)}
_INTERPRETER_TILES = _Tiles(16, 16, 16, 1, 1)
_GROUP_R = 8


def _tiles(dtype: torch.dtype, table: dict[int, _Tiles]) -> _Tiles:
    if INTERPRETED:
        return _INTERPRETER_TILES
    return table[torch.empty((), dtype=dtype).element_size()]


def _dot_fp32(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 dot operands as their raw uint16 bits: upcast them there (exact)."""
    return INTERPRETED and dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str | None:
    """fp32 follows torch's matmul setting (IEEE unless TF32 is allowed); None is the target's default."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return None


def _check_args(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"grouped_mm: x must be 2-D [N, K], got shape {tuple(x.shape)}")
    if w.dim() != 3:
        raise ValueError(f"grouped_mm: w must be 3-D [E, K, M], got shape {tuple(w.shape)}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"grouped_mm: w's K ({w.shape[1]}) must equal x's K ({x.shape[1]}); "
            f"x {tuple(x.shape)}, w {tuple(w.shape)}"
        )
    if offsets.dim() != 1 or offsets.dtype != torch.int32 or offsets.shape[0] != w.shape[0]:
        raise ValueError(
            f"grouped_mm: offsets must be a 1-D int32 tensor of E={w.shape[0]} cumulative row ends, "
            f"got shape {tuple(offsets.shape)} dtype {offsets.dtype}"
        )
    allowed = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
    if x.dtype not in DTYPES:
        raise ValueError(f"grouped_mm: x dtype {x.dtype} unsupported; allowed: {allowed}")
    if w.dtype != x.dtype:
        raise ValueError(f"grouped_mm: w dtype {w.dtype} must equal x dtype {x.dtype}")
    devices = {"x": x.device, "w": w.device, "offsets": offsets.device}
    if len(set(devices.values())) > 1:
        raise ValueError(f"grouped_mm: tensors must share one device, got {devices}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"grouped_mm: x must be on a CUDA device, got {x.device}; "
            "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU"
        )


def _launch_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x`` [N, K] by groups times ``w`` [E, K, M] (any strides) -> [N, M], zeros outside the groups."""
    (n, k), (e, _, m) = x.shape, w.shape
    out = torch.zeros((n, m), dtype=x.dtype, device=x.device)
    if out.numel() == 0 or e == 0 or k == 0:
        return out
    t = _tiles(x.dtype, _TILES)
    grid = ((triton.cdiv(n, t.rows) + e) * triton.cdiv(m, t.cols),)
    _grouped_mm_kernel[grid](
        x,
        w,
        out,
        offsets,
        n,
        k,
        m,
        e,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_R=t.rows,
        BLOCK_C=t.cols,
        BLOCK_K=t.inner,
        GROUP_R=_GROUP_R,
        PRECISION=_precision(x.dtype),
        DOT_FP32=_dot_fp32(x.dtype),
        num_warps=t.warps,
        num_stages=t.stages,
    )
    return out


def _launch_wgrad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[E, K, M]`` with entry e = ``x[rows of e]^T @ grad[rows of e]`` (zeros for empty groups)."""
    (n, k), m, e = x.shape, grad.shape[1], offsets.shape[0]
    if n == 0 or e * k * m == 0:
        return torch.zeros((e, k, m), dtype=x.dtype, device=x.device)
    out = torch.empty((e, k, m), dtype=x.dtype, device=x.device)
    t = _tiles(x.dtype, _WGRAD_TILES)
    grid = (e, triton.cdiv(k, t.inner), triton.cdiv(m, t.cols))
    _grouped_wgrad_kernel[grid](
        x,
        grad,
        out,
        offsets,
        n,
        k,
        m,
        x.stride(0),
        x.stride(1),
        grad.stride(0),
        grad.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_K=t.inner,
        BLOCK_C=t.cols,
        BLOCK_R=t.rows,
        PRECISION=_precision(x.dtype),
        DOT_FP32=_dot_fp32(x.dtype),
        num_warps=t.warps,
        num_stages=t.stages,
    )
    return out


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets):  # type: ignore[override]
        ctx.save_for_backward(x, w, offsets)
        return _launch_grouped_mm(x, w, offsets)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, w, offsets = ctx.saved_tensors
        grad_x = _launch_grouped_mm(grad, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
        grad_w = _launch_wgrad(x, grad, offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of ``x`` [N, K] times ``w[e]`` [K, M] -> [N, M], differentiable.

    ``offsets`` is int32 [E] (cumulative row ends, on x's device); x and w share a dtype
    (fp32, bf16 or fp16) and may have any strides.
    """
    _check_args(x, w, offsets)
    return _GroupedMM.apply(x, w, offsets)


def grouped_rows(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The forward of :func:`grouped_mm` without autograd (the expert FFN brings its own)."""
    _check_args(x, w, offsets)
    return _launch_grouped_mm(x, w, offsets)


def grouped_weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[E, K, M]``: entry e is ``x[rows of e]^T @ grad[rows of e]`` (zeros for empty groups)."""
    if grad.dim() != 2 or grad.shape[0] != x.shape[0]:
        raise ValueError(
            f"grouped_weight_grad: grad must be [N, M] with N = x's rows ({x.shape[0]}), "
            f"got shape {tuple(grad.shape)}"
        )
    experts = offsets.shape[0] if offsets.dim() == 1 else 0
    _check_args(x, x.new_empty(experts, x.shape[1], grad.shape[1]), offsets)
    if grad.dtype != x.dtype:
        raise ValueError(f"grouped_weight_grad: grad dtype {grad.dtype} must equal x dtype {x.dtype}")
    return _launch_wgrad(x, grad, offsets)
