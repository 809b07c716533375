"""Fused dispatch kernels (Triton, CUDA) against the torch reference in smile.moe.kernels.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py) on CPU tensors;
tests marked ``gpu`` compare the compiled Triton and CUDA kernels with the reference on a GPU.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from smile.moe import dispatcher, kernels
from smile.moe.kernels import TorchBackend

triton_dispatch = pytest.importorskip("smile.moe.kernels.triton_dispatch")
TritonBackend = triton_dispatch.TritonBackend

REF = TorchBackend()
HAS_CUDA = torch.cuda.is_available()


def random_routing(tokens: int, k: int, num_experts: int, drop: float, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # k distinct experts per token, as a top-k router picks them; more than half the experts may stay empty.
    ids = torch.rand(tokens, num_experts, generator=gen).topk(k, dim=1).indices
    keep = torch.rand(tokens, k, generator=gen) >= drop
    return ids.to(device), keep.to(device)


def dyadic(shape, dtype, device, seed: int = 1) -> torch.Tensor:
    """Values whose sums and gate products are exact in fp32 (so any summation order agrees)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-64, 64, shape, generator=gen) / 8).to(dtype=dtype, device=device)


def assert_index_equal(got, want) -> None:
    for name, g, w in zip(("dest", "src", "counts"), got, want):
        assert g.dtype == w.dtype == torch.long, name
        assert torch.equal(g.cpu(), w.cpu()), f"{name} differs:\n{g}\n{w}"


# (tokens, k, experts, drop probability); the layout is dropless: only kept copies get rows.
INDEX_CASES = [
    (7, 1, 4, 0.0),
    (150, 2, 8, 0.25),  # 300 copies span several index blocks
    (40, 4, 64, 0.1),  # most experts empty
    (33, 8, 16, 0.5),
    (5, 2, 3, 1.0),  # every copy dropped
    (0, 2, 4, 0.0),  # no tokens
]


@pytest.mark.parametrize("tokens,k,experts,drop", INDEX_CASES)
def test_dispatch_index_matches_reference(device, tokens, k, experts, drop):
    ids, keep = random_routing(tokens, k, experts, drop, device)
    want = REF.dispatch_index(ids.cpu(), keep.cpu(), experts)
    got = TritonBackend().dispatch_index(ids, keep, experts)
    assert_index_equal(got, want)
    _, src, _ = want
    assert src.numel() == int(keep.sum()) and bool((src >= 0).all()), "one row per kept copy, no padding"


def test_dispatch_index_small_blocks(device, monkeypatch):
    """Many index blocks, scanned a few at a time: exercises the carries between blocks and chunks."""
    monkeypatch.setattr(triton_dispatch, "_INDEX_BLOCK", 16)
    monkeypatch.setattr(triton_dispatch, "_SCAN_BLOCK", 4)
    ids, keep = random_routing(150, 2, 8, 0.25, device, seed=7)
    want = REF.dispatch_index(ids.cpu(), keep.cpu(), 8)
    assert_index_equal(TritonBackend().dispatch_index(ids, keep, 8), want)


def test_dispatch_index_rejects_bad_ids(device):
    ids, keep = random_routing(64, 2, 4, 0.0, device)
    bad = ids.clone()
    bad[3, 1] = 9
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        TritonBackend().dispatch_index(bad, keep, 4)
    keep[3, 1] = False  # a dropped copy's id is never looked at
    want = REF.dispatch_index(bad, keep, 4)
    assert_index_equal(TritonBackend().dispatch_index(bad, keep, 4), want)
    with pytest.raises(ValueError, match="keep must be a bool"):
        TritonBackend().dispatch_index(ids, keep.int(), 4)


@pytest.mark.parametrize("hidden", [64, 40, 1056])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rows_matches_reference(device, hidden, dtype):
    ids, keep = random_routing(30, 2, 6, 0.2, device)
    _, src, _ = REF.dispatch_index(ids, keep, 6)
    x = torch.randn(30, hidden, device=device).to(dtype)
    got = TritonBackend().gather_rows(x, src)
    assert torch.equal(got.cpu(), REF.gather_rows(x.cpu(), src.cpu()))
    assert torch.equal(got.cpu(), x.cpu()[src.cpu()])
    # A view with row stride 2H (left half of a wider buffer) is read in place.
    wide = torch.randn(30, 2 * hidden, device=device).to(dtype)[:, :hidden]
    assert torch.equal(TritonBackend().gather_rows(wide, src).cpu(), REF.gather_rows(wide.cpu(), src.cpu()))


@pytest.mark.parametrize("tokens,k,experts", [(50, 1, 4), (50, 2, 8), (12, 8, 16)])
@pytest.mark.parametrize("with_gates", [True, False])
def test_combine_matches_reference(device, tokens, k, experts, with_gates):
    ids, keep = random_routing(tokens, k, experts, 0.2, device)
    dest, src, _ = REF.dispatch_index(ids, keep, experts)
    hidden = 72
    y = dyadic((src.numel(), hidden), torch.float32, device)
    gates = (torch.randint(0, 8, (tokens, k)) / 4).to(device) if with_gates else None
    got = TritonBackend().combine(y, dest, gates)
    assert got.dtype == y.dtype
    assert torch.equal(got.cpu(), REF.combine(y.cpu(), dest.cpu(), None if gates is None else gates.cpu()))
    # Random values: summation order may differ by rounding only.
    y = torch.randn(src.numel(), hidden, device=device)
    gates = torch.rand(tokens, k, device=device) if with_gates else None
    want = REF.combine(y.cpu(), dest.cpu(), None if gates is None else gates.cpu())
    torch.testing.assert_close(TritonBackend().combine(y, dest, gates).cpu(), want, rtol=1e-6, atol=1e-6)


def test_combine_bf16_accumulates_in_fp32(device):
    ids, keep = random_routing(20, 8, 8, 0.0, device)
    dest, src, _ = REF.dispatch_index(ids, keep, 8)
    # Partial sums of 1 + 2^-7 are not representable in bf16; only an fp32 accumulator gives exactly 8.0625.
    y = torch.full((src.numel(), 16), 1 + 2**-7, device=device).to(torch.bfloat16)
    got = TritonBackend().combine(y, dest, None)
    assert torch.equal(got.cpu(), REF.combine(y.cpu(), dest.cpu(), None))
    assert torch.all(got.float() == torch.tensor(8 * (1 + 2**-7)).bfloat16().float())


def test_combine_fp64_accumulates_in_fp64(device):
    ids, keep = random_routing(30, 2, 4, 0.1, device)
    dest, src, _ = REF.dispatch_index(ids, keep, 4)
    y = torch.randn(src.numel(), 24, dtype=torch.float64, device=device) * 1e-9 + 1.0
    gates = torch.rand(30, 2, dtype=torch.float64, device=device)
    got = TritonBackend().combine(y, dest, gates)
    want = REF.combine(y.cpu(), dest.cpu(), gates.cpu())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), want, rtol=1e-15, atol=1e-15)


def test_empty_inputs_give_zero_rows(device):
    """A rank that received no tokens gathers no rows, and an empty y combines to zeros."""
    src = torch.empty(0, dtype=torch.long, device=device)
    x = torch.empty(0, 16, device=device)
    for backend in (REF, TritonBackend()):
        assert backend.gather_rows(x, src).shape == (0, 16)
    dest = torch.full((5, 2), -1, dtype=torch.long, device=device)
    y = torch.empty(0, 16, device=device)
    out = TritonBackend().combine(y, dest, torch.rand(5, 2, device=device))
    assert torch.equal(out.cpu(), torch.zeros(5, 16))


def _layer_grads(backend, x, y_weight, gates, ids, keep, experts):
    x = x.detach().clone().requires_grad_(True)
    gates = gates.detach().clone().requires_grad_(True)
    dest, src, _ = backend.dispatch_index(ids, keep, experts)
    permuted = dispatcher.permute(x, src, dest, backend)
    y = torch.tanh(permuted * y_weight)  # a stand-in for the experts, so every row matters
    out = dispatcher.unpermute_combine(y, gates, dest, src, backend)
    (out * torch.linspace(-1, 1, out.shape[1], device=out.device)).sum().backward()
    return out.detach(), x.grad, gates.grad


def test_gradients_match_reference(device):
    tokens, k, experts, hidden = 24, 2, 4, 32
    ids, keep = random_routing(tokens, k, experts, 0.2, device, seed=3)
    x = torch.randn(tokens, hidden, device=device)
    gates = torch.rand(tokens, k, device=device)
    y_weight = torch.randn(hidden, device=device)
    want = _layer_grads(REF, x.cpu(), y_weight.cpu(), gates.cpu(), ids.cpu(), keep.cpu(), experts)
    got = _layer_grads(TritonBackend(), x, y_weight, gates, ids, keep, experts)
    for name, g, w in zip(("out", "grad x", "grad gates"), got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6, msg=name)


def test_import_without_triton_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "smile.moe.kernels.triton_dispatch")
    with pytest.raises(ImportError):
        importlib.import_module("smile.moe.kernels.triton_dispatch")
    with pytest.raises(ImportError):
        from smile.moe.kernels import TritonBackend  # noqa: F401
    kernels._load_backend.cache_clear()  # other tests may have loaded it already
    try:
        with pytest.raises(RuntimeError, match="'triton' requested but not available"):
            kernels.get_backend("triton")
    finally:
        kernels._load_backend.cache_clear()


# --------------------------------------------------------------------------------------------- GPU


GPU_BACKENDS = ["triton", "cuda"]


def _gpu_backend(name: str):
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    if triton_dispatch.INTERPRETED and name == "triton":
        pytest.skip("TRITON_INTERPRET=1 is set: compiled Triton kernels are not under test")
    if name == "cuda":
        try:
            from smile.moe.kernels.cuda import CudaBackend
        except ImportError as err:
            pytest.skip(str(err))
        return CudaBackend()
    return TritonBackend()


GPU_CASES = [
    (4096, 2, 64),
    (1024, 8, 256),
    (777, 1, 8),
    (500, 3, 16),  # k not a multiple of the rows a CUDA thread loads together
    (3, 2, 4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("tokens,k,experts", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_backend_matches_reference(name, tokens, k, experts, dtype):
    backend = _gpu_backend(name)
    cuda = torch.device("cuda")
    ids, keep = random_routing(tokens, k, experts, 0.1, cuda, seed=tokens)
    want_index = REF.dispatch_index(ids, keep, experts)
    dest, src, counts = backend.dispatch_index(ids, keep, experts)
    assert_index_equal((dest, src, counts), want_index)
    for hidden in (1024, 7168, 36, 7):  # 16-byte vectors, and narrower fallbacks
        x = torch.randn(tokens, hidden, device=cuda).to(dtype)
        assert torch.equal(backend.gather_rows(x, src), REF.gather_rows(x, src))
        y = torch.randn(src.numel(), hidden, device=cuda).to(dtype)
        gates = torch.rand(tokens, k, device=cuda)
        for g in (gates, None):
            got = backend.combine(y, dest, g)
            want = REF.combine(y, dest, g)
            assert got.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:  # one bf16 rounding of an fp32 sum: at most one ulp apart
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_combine_fp64(name):
    backend = _gpu_backend(name)
    cuda = torch.device("cuda")
    ids, keep = random_routing(300, 5, 16, 0.1, cuda, seed=9)
    dest, src, _ = REF.dispatch_index(ids, keep, 16)
    y = torch.randn(src.numel(), 40, dtype=torch.float64, device=cuda) * 1e-9 + 1.0
    gates = torch.rand(300, 5, dtype=torch.float64, device=cuda)
    got = backend.combine(y, dest, gates)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, REF.combine(y, dest, gates), rtol=1e-14, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_gradients_match_reference(name):
    backend = _gpu_backend(name)
    cuda = torch.device("cuda")
    tokens, k, experts, hidden = 512, 2, 16, 256
    ids, keep = random_routing(tokens, k, experts, 0.1, cuda, seed=5)
    x = torch.randn(tokens, hidden, device=cuda)
    gates = torch.rand(tokens, k, device=cuda)
    y_weight = torch.randn(hidden, device=cuda)
    want = _layer_grads(REF, x, y_weight, gates, ids, keep, experts)
    got = _layer_grads(backend, x, y_weight, gates, ids, keep, experts)
    for label, g, w in zip(("out", "grad x", "grad gates"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=label)


@pytest.mark.gpu
def test_gpu_auto_backend_prefers_fused_kernels():
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    backend = kernels.get_backend("auto", torch.device("cuda"))
    assert backend.name in ("cuda", "triton")
