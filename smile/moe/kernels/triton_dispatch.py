"""Triton kernels for token dispatch: destination index, row gather (permute) and gather-combine.

The layout and results are those of :class:`smile.moe.kernels.reference.TorchBackend` (the
reference), but each op is one or a few memory-bound kernels instead of argsort + scatter (index)
and upcast + index_add (combine). Combine is a gather: every output token reads its k rows,
accumulates in fp32 (fp64 for fp64 inputs, as the reference does) and writes once, so there are no
atomics and results are deterministic.

Importing this module needs triton (dispatch.py treats the ImportError as "backend unavailable").
Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels also run on CPU
tensors, which is how the CPU test suite checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smile.moe.kernels.common import check_combine_args, check_gather_args, check_index_args, index_rows

# Copies ranked per program by a pairwise compare ([BLOCK, BLOCK] work, independent of E).
_INDEX_BLOCK = 128
# Blocks scanned per loop step when turning per-block histograms into per-block offsets.
_SCAN_BLOCK = 1024
# Tiles of the row kernels: a row segment of _SEGMENT_BYTES (narrower when H is). Gather copies
# _GATHER_ROWS such segments per program; combine takes as many tokens as keep about _COMBINE_BYTES
# of their k rows in flight, with at most _COMBINE_ELEMS fp32 accumulators per program.
_SEGMENT_BYTES = 4096
_GATHER_ROWS = 4
_GATHER_WARPS = 4
_COMBINE_BYTES = 32768
_COMBINE_ELEMS = 8192
_COMBINE_WARPS = 4


@triton.jit
def _rank_in_block_kernel(ids_ptr, keep_ptr, eid_ptr, rank_ptr, hist_ptr, n, num_experts, num_blocks,
                          BLOCK: tl.constexpr):
    """Rank of every kept copy among earlier same-expert copies of its block, and the block histogram.

    Dropped copies get expert -1; kept copies whose id is out of range get expert ``num_experts``
    (an extra histogram row the host checks and rejects).
    """
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offs = pid * BLOCK + lane
    inb = offs < n
    ids = tl.load(ids_ptr + offs, mask=inb, other=0).to(tl.int64)
    keep = tl.load(keep_ptr + offs, mask=inb, other=0) != 0
    in_range = (ids >= 0) & (ids < num_experts)
    expert = tl.where(keep & inb, tl.where(in_range, ids, num_experts), -1).to(tl.int32)
    same = (expert[:, None] == expert[None, :]) & (expert[None, :] >= 0)
    before = same & (lane[None, :] < lane[:, None])
    rank = tl.sum(before.to(tl.int32), axis=1)
    total = tl.sum(same.to(tl.int32), axis=1)
    tl.store(eid_ptr + offs, expert, mask=inb)
    tl.store(rank_ptr + offs, rank, mask=inb)
    last = (expert >= 0) & (rank + 1 == total)
    tl.store(hist_ptr + expert.to(tl.int64) * num_blocks + pid, total, mask=last)


@triton.jit
def _scan_blocks_kernel(hist_ptr, counts_ptr, num_blocks, BLOCK: tl.constexpr):
    """For one expert (program), turn its per-block counts into exclusive per-block offsets, in place."""
    expert = tl.program_id(0)
    row = hist_ptr + expert.to(tl.int64) * num_blocks
    carry = tl.full((), 0, tl.int32)
    for start in range(0, num_blocks, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_blocks
        h = tl.load(row + offs, mask=mask, other=0)
        tl.store(row + offs, carry + tl.cumsum(h, axis=0) - h, mask=mask)
        carry += tl.sum(h, axis=0)
    tl.store(counts_ptr + expert, carry.to(tl.int64))


@triton.jit
def _expert_base_kernel(counts_ptr, base_ptr, stats_ptr, num_experts, EP: tl.constexpr):
    """First row of each expert (dropless: earlier experts' counts), plus [kept total, out-of-range ids]."""
    e = tl.arange(0, EP)
    mask = e < num_experts
    c = tl.load(counts_ptr + e, mask=mask, other=0)
    tl.store(base_ptr + e, tl.cumsum(c, axis=0) - c, mask=mask)
    tl.store(stats_ptr, tl.sum(c, axis=0))
    tl.store(stats_ptr + 1, tl.load(counts_ptr + num_experts))


@triton.jit
def _write_index_kernel(eid_ptr, rank_ptr, offsets_ptr, base_ptr, dest_ptr, src_ptr, n, k, num_blocks,
                        BLOCK: tl.constexpr):
    """dest[i] = base[e] + (earlier copies of e in earlier blocks) + rank in block; src[dest[i]] = i // k."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    expert = tl.load(eid_ptr + offs, mask=inb, other=-1)
    kept = inb & (expert >= 0)
    rank = tl.load(rank_ptr + offs, mask=kept, other=0)
    block_offset = tl.load(offsets_ptr + expert.to(tl.int64) * num_blocks + pid, mask=kept, other=0)
    base = tl.load(base_ptr + expert, mask=kept, other=0)
    row = base + block_offset + rank
    tl.store(dest_ptr + offs, tl.where(kept, row, -1), mask=inb)
    tl.store(src_ptr + row, (offs // k).to(tl.int64), mask=kept)


@triton.jit
def _gather_rows_kernel(x_ptr, src_ptr, out_ptr, num_rows, hidden, stride_x,
                        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[r, cols] = x[src[r], cols]; zeros for a negative src (a guard: the dropless layout has none)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < num_rows
    col_ok = cols < hidden
    src = tl.load(src_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    vals = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :],
                   mask=(src >= 0)[:, None] & col_ok[None, :], other=0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * hidden + cols[None, :], vals,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, dest_ptr, gates_ptr, out_ptr, tokens, hidden, stride_y,
                    K: tl.constexpr, HAS_GATES: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t, cols] = sum_j gates[t, j] * y[dest[t, j], cols] over dest >= 0, in ACC, written once."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tok_ok = toks < tokens
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=ACC)
    for j in tl.static_range(K):
        d = tl.load(dest_ptr + toks * K + j, mask=tok_ok, other=-1).to(tl.int64)
        valid = d >= 0
        rows = tl.load(y_ptr + d[:, None] * stride_y + cols[None, :],
                       mask=valid[:, None] & col_ok[None, :], other=0.0).to(ACC)
        if HAS_GATES:
            g = tl.load(gates_ptr + toks * K + j, mask=tok_ok & valid, other=0.0).to(ACC)
            acc += rows * g[:, None]
        else:
            acc += rows
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * hidden + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & col_ok[None, :])


INTERPRETED = type(_gather_rows_kernel).__name__ == "InterpretedFunction"


def _tile(hidden: int, element_size: int, rows_per_program: int) -> tuple[int, int]:
    """(rows, columns) per program: a row segment, preferring a width that divides H; narrow rows
    get proportionally more of them."""
    cap = max(16, _SEGMENT_BYTES // element_size)
    divides = hidden & -hidden  # largest power of two dividing hidden
    width = min(cap, divides) if divides >= 256 else min(cap, triton.next_power_of_2(hidden))
    rows = rows_per_program * max(1, cap // width)
    return rows, width


def _combine_tile(hidden: int, element_size: int, k: int) -> tuple[int, int]:
    """(tokens, columns) per combine program."""
    _, width = _tile(hidden, element_size, 1)
    tokens = _COMBINE_BYTES // (k * width * element_size)
    tokens = min(max(1, tokens), max(1, _COMBINE_ELEMS // width))
    return 1 << (tokens.bit_length() - 1), width


class TritonBackend:
    """Dispatch ops as Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"

    @staticmethod
    def _check_device(*tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.device.type != "cuda" and not INTERPRETED:
                raise ValueError(
                    f"triton dispatch backend: tensors must be on a CUDA device, got {t.device}; "
                    "set TRITON_INTERPRET=1 before importing smile.moe.kernels to run the kernels on CPU"
                )

    def dispatch_index(
        self,
        expert_ids: torch.Tensor,
        keep: torch.Tensor,
        num_experts: int,
        kept_total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_index_args(expert_ids, keep, num_experts)
        self._check_device(expert_ids)
        tokens, k = expert_ids.shape
        n = tokens * k
        device = expert_ids.device
        long = dict(dtype=torch.long, device=device)
        counts = torch.zeros(num_experts + 1, **long)  # last slot: kept copies with an out-of-range id
        if n == 0:
            return torch.empty((tokens, k), **long), torch.empty(0, **long), counts[:num_experts]
        ids = expert_ids.reshape(-1).contiguous()
        keep_u8 = keep.reshape(-1).contiguous().view(torch.uint8)
        num_blocks = triton.cdiv(n, _INDEX_BLOCK)
        hist = torch.zeros((num_experts + 1, num_blocks), dtype=torch.int32, device=device)
        expert = torch.empty(n, dtype=torch.int32, device=device)
        rank = torch.empty(n, dtype=torch.int32, device=device)
        _rank_in_block_kernel[(num_blocks,)](ids, keep_u8, expert, rank, hist, n, num_experts, num_blocks,
                                             BLOCK=_INDEX_BLOCK, num_warps=8)
        _scan_blocks_kernel[(num_experts + 1,)](hist, counts, num_blocks, BLOCK=_SCAN_BLOCK)
        base = torch.empty(num_experts, **long)
        stats = torch.empty(2, **long)
        _expert_base_kernel[(1,)](counts, base, stats, num_experts, EP=triton.next_power_of_2(num_experts))
        num_rows = index_rows(stats, num_experts, kept_total)
        src = torch.empty(num_rows, **long)  # every row gets its kept copy's token
        dest = torch.empty(n, **long)
        _write_index_kernel[(num_blocks,)](expert, rank, hist, base, dest, src, n, k, num_blocks,
                                           BLOCK=_INDEX_BLOCK)
        return dest.view(tokens, k), src, counts[:num_experts]

    def gather_rows(self, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        check_gather_args(x, src)
        self._check_device(x, src)
        if x.stride(1) != 1:
            x = x.contiguous()
        src = src.contiguous()
        num_rows, hidden = src.numel(), x.shape[1]
        out = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
        if out.numel() == 0:
            return out
        block_r, block_h = _tile(hidden, x.element_size(), _GATHER_ROWS)
        grid = (triton.cdiv(num_rows, block_r), triton.cdiv(hidden, block_h))
        _gather_rows_kernel[grid](x, src, out, num_rows, hidden, x.stride(0),
                                  BLOCK_R=block_r, BLOCK_H=block_h, num_warps=_GATHER_WARPS)
        return out

    def combine(self, y: torch.Tensor, dest: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        check_combine_args(y, dest, gates)
        self._check_device(y, dest)
        if y.stride(1) != 1:
            y = y.contiguous()
        dest = dest.contiguous()
        gates = gates.contiguous() if gates is not None else None
        (tokens, k), hidden = dest.shape, y.shape[1]
        out = torch.empty((tokens, hidden), dtype=y.dtype, device=y.device)
        if out.numel() == 0:
            return out
        if k == 0:
            return out.zero_()
        block_t, block_h = _combine_tile(hidden, y.element_size(), k)
        grid = (triton.cdiv(tokens, block_t), triton.cdiv(hidden, block_h))
        acc = tl.float64 if y.dtype == torch.float64 else tl.float32  # as the reference accumulates
        _combine_kernel[grid](y, dest, gates if gates is not None else dest, out, tokens, hidden, y.stride(0),
                              K=k, HAS_GATES=gates is not None, ACC=acc,
                              BLOCK_T=block_t, BLOCK_H=block_h, num_warps=_COMBINE_WARPS)
        return out
