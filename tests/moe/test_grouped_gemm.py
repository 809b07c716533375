"""Triton grouped GEMM (smile.moe.kernels.grouped_gemm) and ExpertFFN(gemm="triton") against torch references.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py) on CPU tensors, with
tiny shapes because the interpreter runs every program in Python; tests marked ``gpu`` compare the
compiled kernels with the reference at realistic sizes.
"""

from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smile.moe.config import ACTIVATIONS
from smile.moe.experts import ExpertFFN
from smile.moe.kernels import TorchBackend, TritonBackend
from smile.moe.layer import MoELayer

grouped_gemm = pytest.importorskip("smile.moe.kernels.grouped_gemm")
grouped_mm = grouped_gemm.grouped_mm

HAS_CUDA = torch.cuda.is_available()


def offsets_of(counts: list[int], device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


def per_expert(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The reference: one matmul per group, in fp32."""
    outs, start = [x.new_zeros(0, w.shape[2], dtype=torch.float32)], 0
    for e, n in enumerate(counts):
        outs.append(x[start : start + n].float() @ w[e].float())
        start += n
    return torch.cat(outs)


def run_both(x, w, counts, upstream):
    """(out, grad_x, grad_w) of the kernel and of the reference for loss = sum(out * upstream)."""

    def kernel(a, b):
        return grouped_mm(a, b, offsets_of(counts, a.device))

    def reference(a, b):
        return per_expert(a, b, counts)

    results = []
    for fn in (kernel, reference):
        xa, wa = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        out = fn(xa, wa)
        (out.float() * upstream).sum().backward()
        results.append((out.detach(), xa.grad, wa.grad))
    return results


@pytest.mark.parametrize(
    "counts",
    [[0, 7, 0, 19, 0], [37], [16, 1, 33, 2], [0, 0, 0]],
    ids=["empty-first-middle-last", "single-expert", "tile-edges", "no-rows"],
)
def test_forward_and_gradients_match_per_expert_reference(device, counts):
    gen = torch.Generator().manual_seed(len(counts))
    n, k, m = sum(counts), 24, 40  # none a multiple of the 16-wide interpreter tiles
    x = torch.randn(n, k, generator=gen).to(device)
    w = torch.randn(len(counts), k, m, generator=gen).to(device)
    upstream = torch.randn(n, m, generator=gen).to(device)
    (out, gx, gw), (ref, rgx, rgw) = run_both(x, w, counts, upstream)
    assert out.shape == (n, m) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rgw, rtol=1e-5, atol=1e-5)
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(gw[e]) == 0, f"empty expert {e} got a weight gradient"


def test_transposed_and_broadcast_strides(device):
    """Weights stored [E, M, K], x a transposed view and a stride-0 upstream gradient (from .sum())."""
    counts = [5, 0, 11]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(20, sum(counts), generator=gen).to(device).t()  # [N, K] view with strides (1, N)
    w = torch.randn(3, 18, 20, generator=gen).to(device).transpose(1, 2)  # [E, K, M] view
    assert not x.is_contiguous() and not w.is_contiguous()
    xa, wa = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = grouped_mm(xa, wa, offsets_of(counts, device))
    out.sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    per_expert(xr, wr, counts).sum().backward()
    torch.testing.assert_close(out, per_expert(x, w, counts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wa.grad, wr.grad, rtol=1e-5, atol=1e-5)


def test_rows_past_the_last_offset_are_zero(device):
    x, w = torch.randn(10, 16, device=device), torch.randn(2, 16, 16, device=device)
    out = grouped_mm(x, w, offsets_of([3, 4], device))
    torch.testing.assert_close(out[:7], per_expert(x, w, [3, 4]), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out[7:]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_matches_reference(device, dtype):
    counts = [9, 0, 14]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(counts), 24, generator=gen).to(device, dtype)
    w = torch.randn(3, 24, 20, generator=gen).to(device, dtype)
    upstream = torch.randn(sum(counts), 20, generator=gen).to(device)
    (out, gx, gw), (ref, rgx, rgw) = run_both(x, w, counts, upstream)
    assert out.dtype == gx.dtype == gw.dtype == dtype
    # fp32 accumulation of exact products: only the final rounding to the 16-bit output differs.
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(gx.float(), rgx.float(), **tol)
    torch.testing.assert_close(gw.float(), rgw.float(), **tol)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expert_ffn_triton_equals_bmm(device, activation):
    counts = [6, 0, 13]  # d_ff 24 (gated: 48) is not a multiple of the tiles either
    ffns = {g: ExpertFFN(3, 16, 24, activation, seed=5, gemm=g).to(device) for g in ("triton", "bmm")}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), 16, generator=gen).to(device)
    upstream = torch.randn(sum(counts), 16, generator=gen).to(device)
    results = {}
    for gemm, ffn in ffns.items():
        xa = x.clone().requires_grad_()
        out = ffn(xa, torch.tensor(counts))
        (out * upstream).sum().backward()
        results[gemm] = (out.detach(), xa.grad, ffn.w_in.grad, ffn.w_out.grad)
    names = ("out", "x.grad", "w_in.grad", "w_out.grad")
    for name, got, want in zip(names, results["triton"], results["bmm"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_expert_ffn_triton_with_no_rows_still_reaches_the_weights(device):
    ffn = ExpertFFN(2, 16, 16, "relu", gemm="triton").to(device)
    ffn(torch.zeros(0, 16, device=device), [0, 0]).sum().backward()
    assert ffn.w_in.grad is not None and ffn.w_out.grad is not None


def test_bad_inputs_name_the_argument():
    x, w, off = torch.randn(4, 8), torch.randn(2, 8, 16), torch.tensor([1, 4], dtype=torch.int32)
    cases = [
        ((x[None], w, off), "x must be 2-D"),
        ((x, w[0], off), "w must be 3-D"),
        ((x, torch.randn(2, 6, 16), off), "w's K \\(6\\) must equal x's K \\(8\\)"),
        ((x, w, off.long()), "offsets must be a 1-D int32 tensor of E=2"),
        ((x, w, off[:1]), "offsets must be a 1-D int32 tensor of E=2"),
        (
            (x.double(), w.double(), off),
            "x dtype torch.float64 unsupported; allowed: float32, bfloat16, float16",
        ),
        ((x, w.half(), off), "w dtype torch.float16 must equal x dtype torch.float32"),
        ((x, w, off.to("meta")), "tensors must share one device"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            grouped_mm(*args)
    with pytest.raises(ValueError, match="allowed: auto, grouped_mm, bmm, triton"):
        ExpertFFN(2, 8, 16, gemm="cutlass")


@pytest.mark.skipif(grouped_gemm.INTERPRETED, reason="under TRITON_INTERPRET=1 CPU tensors are allowed")
def test_cpu_tensors_without_the_interpreter_are_refused():
    x, w, off = torch.randn(4, 8), torch.randn(2, 8, 16), torch.tensor([1, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="x must be on a CUDA device, got cpu; set TRITON_INTERPRET=1"):
        grouped_mm(x, w, off)


def test_auto_keeps_bmm_on_cpu():
    assert ExpertFFN(2, 8, 16).resolve_gemm(torch.randn(3, 8, dtype=torch.bfloat16)) == "bmm"


class _HostSyncs(TorchDispatchMode):
    """Records the ops that make a GPU wait for the host: reading a value back (item, bool, int),
    and ops whose output size depends on values (nonzero, boolean-mask indexing, bincount)."""

    WAITS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.bincount.default",
             "aten.masked_select.default", "aten.unique_consecutive.default", "aten._unique2.default"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def record(self, what: str) -> None:
        frames = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-2]]
        self.seen.append(f"{what} at {' <- '.join(reversed(frames[-3:]))}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        indices = [t for a in args if isinstance(a, (list, tuple)) for t in a]
        masked = any(getattr(t, "dtype", None) == torch.bool for t in indices)
        if str(func) in self.WAITS or (masked and str(func).startswith("aten.index")):
            self.record(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_syncs(device: torch.device | None = None):
    """The recorded waits (``tolist`` is patched: it reads memory without a dispatched op); on a
    GPU, CUDA's own sync check also raises on any wait."""
    mode, tolist = _HostSyncs(), torch.Tensor.tolist

    def recorded_tolist(tensor):
        mode.record("Tensor.tolist")
        return tolist(tensor)

    on_gpu = device is not None and device.type == "cuda"
    torch.Tensor.tolist = recorded_tolist
    if on_gpu:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with mode:
            yield mode.seen
    finally:
        torch.Tensor.tolist = tolist
        if on_gpu:
            torch.cuda.set_sync_debug_mode("default")


def test_host_sync_recorder_sees_what_it_must():
    ids = torch.tensor([0, 2, 2])
    with host_syncs() as seen:
        ids.tolist(), int(ids.sum()), ids[ids > 0], torch.bincount(ids)
    assert len(seen) == 4, seen


@pytest.mark.parametrize("router", ["topk", "bilevel"])
def test_single_rank_layer_never_waits_for_the_host(device, router):
    """Dropless single-GPU path: router -> fused index and permute -> grouped GEMMs -> fused combine,
    forward and backward, with every count left on the device (the finite-logits check is an
    asynchronous device assert on a GPU and a host check on CPU, so it is off here)."""
    torch.manual_seed(0)
    k = {"k": 2} if router == "topk" else {}  # bilevel: k_node x k_gpu = 1 x 1
    layer = MoELayer(32, 48, 4, router=router, **k, capacity_factor=None, check_finite=False,
                     backend="triton", gemm="triton").to(device)
    x = torch.randn(24, 32, device=device, requires_grad=True)
    layer(x)[0].sum().backward()  # first call: kernel compilation and caches
    with host_syncs(device) as seen:
        out, aux = layer(x)
        (out.square().sum() + aux).backward()
    assert seen == []
    assert x.grad is not None and layer.experts.w_in.grad is not None


def test_kept_total_is_checked_against_the_keep_mask(device):
    """A wrong claim is an error, never a short buffer: raised by the reference, and by the kernels'
    device assert (run here only on CPU: a failed device assert ends a GPU process)."""
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]], device=device)
    keep = torch.ones_like(ids, dtype=torch.bool)
    dropped = keep.clone()
    dropped[1, 0] = False
    for backend in (TorchBackend(), TritonBackend()):
        dest, src, counts = backend.dispatch_index(ids, keep, 3, kept_total=6)
        want = TorchBackend().dispatch_index(ids.cpu(), keep.cpu(), 3)
        assert [t.cpu().tolist() for t in (dest, src, counts)] == [t.tolist() for t in want]
        if device.type == "cpu":
            with pytest.raises((ValueError, RuntimeError), match="kept_total=6 was given"):
                backend.dispatch_index(ids, dropped, 3, kept_total=6)


# --------------------------------------------------------------------------------------------- GPU


def _compiled_gpu() -> torch.device:
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    if grouped_gemm.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: compiled Triton kernels are not under test")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
def test_gpu_matches_reference(dtype):
    cuda = _compiled_gpu()
    gen = torch.Generator().manual_seed(0)
    counts = [0, 700, 1, 0, 1290, 129, 300, 0]  # empty first/middle/last, tails of every tile size
    n, k, m = sum(counts), 512, 776
    x = torch.randn(n, k, generator=gen).to(cuda, dtype)
    w = (torch.randn(len(counts), k, m, generator=gen) / k**0.5).to(cuda, dtype)
    upstream = torch.randn(n, m, generator=gen).to(cuda)
    (out, gx, gw), (ref, rgx, rgw) = run_both(x, w, counts, upstream)
    # Reference: fp32 products of the same rounded inputs; the kernel rounds once, at its output.
    rel = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    for name, got, want in (("out", out, ref), ("grad_x", gx, rgx), ("grad_w", gw, rgw)):
        err = (got.float() - want.float()).norm() / want.float().norm()
        assert err < rel, f"{name}: relative error {err:.2e} >= {rel:.0e}"
    assert torch.count_nonzero(gw[[0, 3, 7]]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gpu_expert_ffn_auto_picks_triton_for_fp16(activation):
    cuda = _compiled_gpu()
    ffns = {g: ExpertFFN(4, 256, 384, activation, seed=2, gemm=g).to(cuda) for g in ("auto", "bmm")}
    x = torch.randn(1000, 256, device=cuda, dtype=torch.float16)
    expected = "triton" if torch.cuda.get_device_capability() >= (8, 0) else "bmm"
    assert ffns["auto"].resolve_gemm(x) == expected
    counts = torch.tensor([0, 611, 389, 0])
    outs = [ffn(x, counts).float() for ffn in ffns.values()]
    assert ((outs[0] - outs[1]).norm() / outs[1].norm()) < 5e-3
