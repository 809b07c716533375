"""Expert FFNs: grouped GEMM and batched GEMM equal a per-expert loop, gradients included."""

from __future__ import annotations

import pytest
import torch

from smile.moe.config import ACTIVATIONS
from smile.moe.experts import ExpertFFN, is_expert_parameter
from smile.moe.layer import MoELayer


def _per_expert_reference(ffn: ExpertFFN, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs, start = [], 0
    for i, n in enumerate(counts):
        rows = x[start : start + n]
        outs.append(ffn._act(rows @ ffn.w_in[i]) @ ffn.w_out[i])
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("gemm", ["grouped_mm", "bmm"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gemm_paths_equal_per_expert_loop(gemm, activation):
    torch.manual_seed(0)
    for counts in ([5, 0, 9, 2], [0, 0, 7, 0], [3, 3, 3, 3]):  # random sizes, empty experts, equal
        ffn = ExpertFFN(4, 16, 24, activation, seed=3, gemm=gemm)
        ref = ExpertFFN(4, 16, 24, activation, seed=3, gemm=gemm)
        x = torch.randn(sum(counts), 16)
        upstream = torch.randn(sum(counts), 16)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        (ffn(xa, torch.tensor(counts)) * upstream).sum().backward()
        (_per_expert_reference(ref, xb, counts) * upstream).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ffn.w_in.grad, ref.w_in.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ffn.w_out.grad, ref.w_out.grad, rtol=1e-5, atol=1e-5)


def test_grouped_mm_forward_matches_bmm_through_the_layer():
    outs = []
    for gemm in ("grouped_mm", "bmm"):
        torch.manual_seed(0)
        layer = MoELayer(16, 32, 8, router="topk", k=2, capacity_factor=None, gemm=gemm)
        x = torch.randn(40, 16, requires_grad=True)
        out, aux = layer(x)
        (out.square().sum() + aux).backward()
        outs.append((out.detach(), x.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_expert_parameters_are_tagged_and_options_validated():
    ffn = ExpertFFN(2, 8, 16)
    assert all(is_expert_parameter(p) for p in ffn.parameters())
    with pytest.raises(ValueError, match="allowed: auto, grouped_mm, bmm"):
        ExpertFFN(2, 8, 16, gemm="cutlass")
    with pytest.raises(ValueError, match="allowed: gelu, relu, swiglu, geglu"):
        ExpertFFN(2, 8, 16, activation="tanh")
    with pytest.raises(ValueError, match="expected 2 expert counts"):
        ffn(torch.randn(3, 8), [1, 1, 1])
