"""Token permute and combine side by side: copy ceiling, torch reference, Triton and CUDA backends.

For every shape (T tokens x H hidden, E experts, top-k, dtype) it times, per backend:
  index    dispatch_index (dest/src/counts from expert ids; includes its one host sync)
  permute  gather_rows only (rows in expert order, given src): index building is NOT included
  combine  combine with gates (out[t] = sum_j gates[t, j] * y[dest[t, j]], fp32 accumulation)
Effective bandwidth counts bytes as /work/shared/ANCHORS.md does: permute reads and writes T*k*H
elements, combine reads T*k*H and writes T*H; "% copy" compares it with a device-to-device copy
(read + write) timed in the same run. Every backend's results are checked against the torch
reference on fresh random inputs (index exact, permute exact, combine relative error below 1e-2 for
bf16/fp16 and 1e-5 for fp32); a failed check is reported and makes the exit status 1.

GPU timings are medians from triton.testing.do_bench. ``--device cpu`` runs tiny shapes with the
torch reference and the Triton kernels in Triton's interpreter (a smoke run, not a measurement).

Run from the repository root: ``PYTHONPATH=. python benchmarks/dispatch_bench.py [--device cpu]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from smile.moe.kernels import TorchBackend

GPU_SHAPES = [  # (tokens, hidden, experts, k); the first two are the anchors
    (16384, 4096, 64, 2),
    (4096, 7168, 256, 8),
    (16384, 4096, 8, 1),
    (16384, 2048, 8, 2),
    (8192, 4096, 128, 8),
    (16384, 1024, 64, 2),
]
CPU_SHAPES = [(64, 32, 4, 2), (48, 40, 8, 8), (96, 16, 8, 1)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


@dataclass
class Row:
    tokens: int
    hidden: int
    experts: int
    k: int
    dtype: str
    op: str
    backend: str
    ms: float
    tbps: float | None
    pct_of_copy: float | None
    speedup_vs_torch: float | None
    check: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=["cuda", "cpu"], default=default_device)
    p.add_argument("--dtypes", default="bf16,fp32", help=f"comma list from {sorted(DTYPES)}")
    p.add_argument("--shapes", default=None, help="T:H:E:k,... (default: the built-in list for the device)")
    p.add_argument("--backends", default="torch,triton,cuda", help="comma list from torch,triton,cuda")
    p.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy-ceiling buffer on GPU")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--out", type=Path, default=Path("runs/dispatch_bench"), help="directory for the JSON")
    args = p.parse_args(argv)
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {bad}; allowed: {sorted(DTYPES)}")
    bad = [b for b in args.backends.split(",") if b not in ("torch", "triton", "cuda")]
    if bad:
        p.error(f"--backends: unknown {bad}; allowed: torch, triton, cuda")
    return args


def parse_shapes(text: str | None, device: str) -> list[tuple[int, int, int, int]]:
    if text is None:
        return GPU_SHAPES if device == "cuda" else CPU_SHAPES
    shapes = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 4:
            raise SystemExit(f"--shapes: {item!r} is not T:H:E:k")
        shapes.append(tuple(int(v) for v in parts))
    return shapes


def load_backends(names: list[str], device: str) -> dict[str, object]:
    backends: dict[str, object] = {}
    for name in names:
        if name == "torch":
            backends[name] = TorchBackend()
        elif name == "triton":
            try:
                from smile.moe.kernels import TritonBackend
            except ImportError as err:
                print(f"# triton backend unavailable: {err}")
                continue
            backends[name] = TritonBackend()
        elif name == "cuda":
            if device != "cuda":
                continue
            try:
                from smile.moe.kernels.cuda import CudaBackend
            except ImportError as err:
                print(f"# cuda backend unavailable: {err}")
                continue
            backends[name] = CudaBackend()
    return backends


def make_timer(device: str, warmup: int, rep: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn: do_bench on GPU, wall clock on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def wall(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return wall


def routing(tokens: int, k: int, experts: int, device: str, seed: int):
    """Top-k expert ids (distinct per token), every copy kept (the dropless layout)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=gen, device=device)
    ids = scores.topk(k, dim=1).indices
    keep = torch.ones(tokens, k, dtype=torch.bool, device=device)
    return ids, keep


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.float().abs().max().item()
    return (got.float() - want.float()).abs().max().item() / max(scale, 1e-30)


def check_backend(backend, shape, dtype, device: str, seed: int) -> dict[str, str]:
    """Compare each op with the torch reference on fresh random inputs; returns op -> verdict."""
    ref = TorchBackend()
    tokens, hidden, experts, k = shape
    ids, keep = routing(tokens, k, experts, device, seed)
    want_index = ref.dispatch_index(ids, keep, experts)
    got_index = backend.dispatch_index(ids, keep, experts)
    same = all(torch.equal(g, w) for g, w in zip(got_index, want_index))
    verdict = {"index": "ok" if same else "FAIL: dest/src/counts differ"}
    dest, src, _ = want_index
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    err = rel_err(backend.gather_rows(x, src), ref.gather_rows(x, src))
    verdict["permute"] = "ok" if err == 0 else f"FAIL: rel err {err:.2e}"
    y = torch.randn(src.numel(), hidden, generator=gen, device=device).to(dtype)
    gates = torch.rand(tokens, k, generator=gen, device=device)
    err = rel_err(backend.combine(y, dest, gates), ref.combine(y, dest, gates))
    verdict["combine"] = f"ok ({err:.1e})" if err < TOLERANCE[dtype] else f"FAIL: rel err {err:.2e}"
    return verdict


def copy_ceiling(device: str, nbytes: int, timer) -> tuple[float, float]:
    """(ms, TB/s counting read + write) of a device-to-device copy of nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return ms, 2 * nbytes / (ms * 1e-3) / 1e12


def bench_case(shape, dtype_name: str, backends: dict, args: argparse.Namespace, timer, copy_tbps: float):
    """Check, then time index / permute / combine of every backend on one shape and dtype."""
    device, dtype = args.device, DTYPES[dtype_name]
    tokens, hidden, experts, k = shape
    ids, keep = routing(tokens, k, experts, device, seed=0)
    dest, src, _ = TorchBackend().dispatch_index(ids, keep, experts)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    y = torch.randn(src.numel(), hidden, device=device).to(dtype)
    gates = torch.rand(tokens, k, device=device)
    elem = x.element_size()
    moved = {
        "index": None,
        "permute": 2 * tokens * k * hidden * elem,
        "combine": (tokens * k * hidden + tokens * hidden) * elem,
    }
    rows, torch_ms = [], {}
    for name, backend in backends.items():
        verdict = check_backend(backend, shape, dtype, device, seed=1)
        ops = {
            "index": lambda b=backend: b.dispatch_index(ids, keep, experts),
            "permute": lambda b=backend: b.gather_rows(x, src),
            "combine": lambda b=backend: b.combine(y, dest, gates),
        }
        for op, fn in ops.items():
            ms = timer(fn)
            if name == "torch":
                torch_ms[op] = ms
            tbps = moved[op] / (ms * 1e-3) / 1e12 if moved[op] else None
            pct = 100 * tbps / copy_tbps if tbps else None
            speedup = torch_ms[op] / ms if op in torch_ms else None
            rows.append(
                Row(tokens, hidden, experts, k, dtype_name, op, name, ms, tbps, pct, speedup, verdict[op])
            )
    return rows


def run(args: argparse.Namespace) -> tuple[list[Row], dict]:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device; use --device cpu")
    timer = make_timer(device, args.warmup, args.rep)
    backends = load_backends(args.backends.split(","), device)
    shapes = parse_shapes(args.shapes, device)
    copy_bytes = int(args.copy_gib * 2**30) if device == "cuda" else 2**24
    copy_ms, copy_tbps = copy_ceiling(device, copy_bytes, timer)
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "copy": {"bytes": copy_bytes, "ms": copy_ms, "tbps": copy_tbps},
        "layout": "dropless (every copy kept)",
        "timing": "triton.testing.do_bench median" if device == "cuda" else "wall-clock median of 5 (smoke)",
        "permute_excludes_index": True,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(
        f"# {meta['device']}: copy {copy_bytes / 2**30:.2f} GiB {copy_ms:.3f} ms = {copy_tbps:.2f} TB/s "
        "(read + write); permute = gather_rows only, index timed separately"
    )
    rows: list[Row] = []
    for shape in shapes:
        for dtype_name in args.dtypes.split(","):
            rows += bench_case(shape, dtype_name, backends, args, timer, copy_tbps)
    return rows, meta


def table(rows: list[Row]) -> str:
    head = "| T | H | E | k | dtype | op | backend | ms | TB/s | % copy | vs torch | check |"
    lines = [head, "|" + "---|" * 12]

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        lines.append(
            f"| {r.tokens} | {r.hidden} | {r.experts} | {r.k} | {r.dtype} | {r.op} | {r.backend} "
            f"| {r.ms:.4f} | {fmt(r.tbps, '.3f')} | {fmt(r.pct_of_copy, '.1f')} "
            f"| {fmt(r.speedup_vs_torch, '.2f')}x | {r.check} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before smile.moe.kernels imports triton
    rows, meta = run(args)
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dispatch_bench.md").write_text(text + "\n")
    record = {"meta": meta, "rows": [asdict(r) for r in rows]}
    (args.out / "dispatch_bench.json").write_text(json.dumps(record, indent=1))
    failed = [r for r in rows if not r.check.startswith("ok")]
    for r in failed:
        case = f"T={r.tokens} H={r.hidden} E={r.experts} k={r.k} {r.dtype}"
        print(f"# CHECK FAILED: {r.backend} {r.op} {case}: {r.check}")
    print(f"# wrote {args.out / 'dispatch_bench.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
