"""One MoE layer on one GPU: smile's fused path vs a torch loop, DeepSpeed-MoE and a dense matmul.

Forward + backward in bf16 over the shapes of ANCHORS.md. "Expert TFLOP/s" counts only the two
expert matmuls over the routed tokens, 3x forward for forward + backward (12 * T*k * d * ff).
Every layer is timed in the same run with triton.testing.do_bench (median), after its output
was checked against the torch loop on the same weights. Prints a table; writes JSON.
``--profile`` also breaks smile's step down by kernel (GEMMs, dispatch and combine, elementwise,
other) with torch.profiler, and gives the TFLOP/s inside the GEMM kernels alone: it says whether
the GEMMs themselves or the time around them limit the layer. It then times the expert FFN's three
autograd stages alone (forward, input gradients, weight gradients: two grouped GEMMs each, the
first two with the activation) for every GEMM strategy, which names the slow GEMM.

    python benchmarks/moe_layer_gpu_bench.py --profile --json results.json
    python benchmarks/moe_layer_gpu_bench.py --device cpu --tiny     # smoke run anywhere
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from smile.moe.kernels import get_backend
from smile.moe.layer import MoELayer

SHAPES = [  # T, d_model, d_ff, E, k
    (16384, 2048, 8192, 8, 1),
    (16384, 2048, 8192, 8, 2),
    (16384, 1024, 4096, 64, 2),
]
TINY = [(256, 64, 128, 8, 2)]
# Kernel (CUDA) or op (CPU) name -> category; the first match wins, the rest is "other".
CATEGORIES = (
    (
        "gemm",
        re.compile(r"gemm|xmma|cutlass|nvjet|wgmma|grouped_mm|grouped_wgrad|aten::(bmm|mm|addmm)\b", re.I),
    ),
    (
        "dispatch+combine",
        re.compile(
            r"gather_rows|combine|rank_in_block|scan_blocks|expert_base|write_index|index|scatter|"
            r"gather|sort|bincount|cumsum",
            re.I,
        ),
    ),
    (
        "elementwise",
        re.compile(r"elementwise|vectorized|gelu|silu|mul|add|div|exp|softmax|copy|fill|cat", re.I),
    ),
)


def torch_loop(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The common baseline: argsort + index_select + per-expert matmuls + index_add."""
    plan = layer.router(x)
    flat_ids = plan.expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=layer.num_experts).tolist()
    rows = x.index_select(0, order // plan.expert_ids.shape[1])
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    outs, start = [], 0
    for e, n in enumerate(counts):
        outs.append(F.gelu(rows[start : start + n] @ w_in[e]) @ w_out[e])
        start += n
    weighted = torch.cat(outs).float() * plan.gates.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, order // plan.expert_ids.shape[1], weighted)
    return out.to(x.dtype)


def deepspeed_layer(d: int, ff: int, experts: int, k: int, cf: float):
    """deepspeed.moe.layer.MoE with ep_size 1 (None when DeepSpeed is not installed)."""
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE
    except ImportError as err:
        print(f"DeepSpeed-MoE skipped: {err}")
        return None
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        for var in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(var, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    expert = torch.nn.Sequential(
        torch.nn.Linear(d, ff, bias=False), torch.nn.GELU(), torch.nn.Linear(ff, d, bias=False)
    )
    layer = MoE(
        d,
        expert,
        num_experts=experts,
        ep_size=1,
        k=k,
        capacity_factor=cf,
        eval_capacity_factor=cf,
        min_capacity=0,
        drop_tokens=True,
    )
    layer.set_deepspeed_parallelism()
    return layer


def timed(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def _output(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    return layer(x)[0]


def fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        forward(x).backward(grad)

    return run


def profile_breakdown(run: Callable[[], None], device: str, expert_flops: float, steps: int = 3) -> dict:
    """Time per step by category of kernel (CUDA) or op self time (CPU), over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    run()  # warm-up: compiled kernels and cached layouts
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        if device == "cuda":
            torch.cuda.synchronize()
    per_name: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if on_device == (device == "cuda"):
            micros = event.self_device_time_total if on_device else event.self_cpu_time_total
            per_name[event.key] += micros / 1e3 / steps
    categories = {name: 0.0 for name, _ in CATEGORIES} | {"other": 0.0}
    for name, ms in per_name.items():
        category = next((c for c, pattern in CATEGORIES if pattern.search(name)), "other")
        categories[category] += ms
    total = sum(categories.values())
    top = sorted(per_name.items(), key=lambda item: -item[1])[:5]
    return {
        "total_ms": total,
        "ms": categories,
        "gemm_tflops": expert_flops / categories["gemm"] / 1e9 if categories["gemm"] else float("nan"),
        "top": [[name[:80], ms] for name, ms in top],
    }


def expert_stages(layer: MoELayer, x: torch.Tensor, device: str) -> dict[str, dict[str, float]]:
    """ms and TFLOP/s of each autograd stage of the layer's expert FFN alone, on the group sizes
    the layer's router gives ``x`` (4 * rows * d * ff FLOPs per stage with GELU)."""
    ffn = layer.experts
    with torch.no_grad():
        layer(x)
        counts = layer.last_stats.tokens_per_expert  # one rank: every expert is local
        rows = torch.randn(x.shape[0] * layer.router.k, ffn.d_model, device=x.device, dtype=x.dtype)
        out, saved = ffn.forward_rows(rows, counts)
        grad = torch.randn_like(out)
        _, wgrad_rows = ffn.backward_rows(grad, saved, counts)
    runs = {
        "forward": lambda: ffn.forward_rows(rows, counts),
        "input_grads": lambda: ffn.backward_rows(grad, saved, counts),
        "weight_grads": lambda: ffn.weight_grads(wgrad_rows, counts),
    }
    flops = 4 * rows.shape[0] * ffn.d_model * ffn.d_ff
    stages = {}
    for name, run in runs.items():
        with torch.no_grad():
            ms = timed(run, device)
        stages[name] = {"ms": ms, "tflops": flops / ms / 1e9}
    return stages


def _shape(r: dict) -> str:
    return f"{r['T']},{r['d_model']},{r['d_ff']},{r['E']},{r['k']}"


def dense_ceiling(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device == "cuda" else 256
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = timed(lambda: a @ b, device)
    return 2 * n**3 / ms / 1e9


def bench_shape(shape, device: str, dtype: torch.dtype, cf: float, profile: bool = False) -> dict:
    tokens, d, ff, experts, k = shape

    def build(gemm: str) -> MoELayer:
        """Dropless layer, same weights for every GEMM strategy (same seed)."""
        torch.manual_seed(0)
        router = "topk" if k > 1 else "switch"
        return MoELayer(
            d,
            ff,
            experts,
            router=router,
            k=k,
            capacity_factor=None,
            aux_loss_weight=0.0,
            check_finite=False,
            gemm=gemm,
        ).to(device, dtype)

    layer = build("auto")
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, d, device=device, dtype=dtype)
    flops = 12 * tokens * k * d * ff
    row = {
        "T": tokens,
        "d_model": d,
        "d_ff": ff,
        "E": experts,
        "k": k,
        "gemm": layer.experts.resolve_gemm(x.detach()),
        "dispatch_backend": get_backend(layer.dispatcher.backend_name, x.device).name,
    }
    with torch.no_grad():
        ref = torch_loop(layer, x).float()
        got = layer(x)[0].float()
    row["rel_err_vs_loop"] = float((got - ref).norm() / ref.norm())
    smiles = {"smile": layer, "smile_bmm": build("bmm")}
    if device == "cuda":
        smiles["smile_triton"] = build("triton")
    variants = {"torch_loop": fwd_bwd(lambda t: torch_loop(layer, t), x, grad)}
    for name, built in smiles.items():
        variants[name] = fwd_bwd(functools.partial(_output, built), x, grad)
    try:
        ds = deepspeed_layer(d, ff, experts, k, cf)
    except Exception as err:  # noqa: BLE001 - report and go on with the other layers
        print(f"DeepSpeed-MoE failed to build: {err!r}")
        ds = None
    if ds is not None:
        ds = ds.to(device, dtype)
        variants[f"deepspeed_cf{cf}"] = fwd_bwd(lambda t: ds(t.unsqueeze(0))[0].squeeze(0), x, grad)
    if profile:
        try:
            row["profile_smile"] = profile_breakdown(variants["smile"], device, flops)
            row["expert_stages"] = {
                f"{name} ({built.experts.resolve_gemm(x.detach())})": expert_stages(built, x.detach(), device)
                for name, built in smiles.items()
            }
        except Exception as err:  # noqa: BLE001 - the timings below still stand without it
            print(f"profiling smile failed at {shape}: {err!r}")
    for name, run in variants.items():
        try:
            ms = timed(run, device)
        except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
            print(f"{name} failed at {shape}: {err!r}")
            ms = float("nan")
        row[f"{name}_ms"] = ms
        row[f"{name}_tflops"] = flops / ms / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="one small shape (smoke run)")
    parser.add_argument("--capacity-factor", type=float, default=1.0, help="for DeepSpeed-MoE")
    parser.add_argument("--profile", action="store_true", help="break smile's step down by kernel")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shapes = TINY if args.tiny or args.device == "cpu" else SHAPES
    ceiling = dense_ceiling(args.device, dtype)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"device {name}, {dtype}, dense matmul ceiling {ceiling:.0f} TFLOP/s, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    rows = []
    for shape in shapes:
        rows.append(bench_shape(shape, args.device, dtype, args.capacity_factor, args.profile))
        print(json.dumps(rows[-1]), flush=True)
    variants = [k[:-3] for k in rows[0] if k.endswith("_ms")]
    header = f"{'T,d,ff,E,k':24}" + "".join(f"{v:>22}" for v in variants) + f"{'smile/loop':>11}{'gemm':>11}"
    print(header, flush=True)
    for r in rows:
        cells = "".join(f"{r[v + '_ms']:9.2f} ms {r[v + '_tflops']:6.0f} TF" for v in variants)
        print(f"{_shape(r):24}{cells}{r['torch_loop_ms'] / r['smile_ms']:10.2f}x{r['gemm']:>11}")
    for r in rows:
        for name, stages in r.get("expert_stages", {}).items():
            parts = ", ".join(
                f"{stage} {v['ms']:.2f} ms ({v['tflops']:.0f} TF)" for stage, v in stages.items()
            )
            together = sum(v["ms"] for v in stages.values())
            print(
                f"experts alone, {_shape(r)}, {name}: {parts}; "
                f"together {together:.2f} ms"
            )
        if "profile_smile" in r:
            p = r["profile_smile"]
            parts = ", ".join(
                f"{name} {ms:.2f} ms ({ms / max(p['total_ms'], 1e-9):.0%})" for name, ms in p["ms"].items()
            )
            print(
                f"smile step by kernel, {_shape(r)}: "
                f"{p['total_ms']:.2f} ms = {parts}; {p['gemm_tflops']:.0f} TFLOP/s inside the GEMMs; "
                f"top: {'; '.join(f'{name} {ms:.2f} ms' for name, ms in p['top'])}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": name,
                    "dtype": str(dtype),
                    "ceiling_tflops": ceiling,
                    "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d"),
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
