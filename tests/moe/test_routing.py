"""Routers: hand-computed losses, capacity and drops, priorities, options and input errors."""

from __future__ import annotations

import math

import pytest
import torch

from smile.moe.config import MoEConfig
from smile.moe.routing import BilevelRouter, SwitchRouter, TopKRouter, build_router, capacity_keep


def _p(a: float, b: float) -> tuple[float, float]:
    za, zb = math.exp(a), math.exp(b)
    return za / (za + zb), zb / (za + zb)


def test_switch_load_balance_matches_hand_computation():
    router = SwitchRouter(2, 2, capacity_factor=None, aux_loss_weight=0.5)
    with torch.no_grad():
        router.proj.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    plan = router(x)
    p_a, p_b = _p(2, 0), _p(0, 1)  # tokens [1,0] pick expert 0, token [0,1] picks expert 1
    mean_p = [(3 * p_a[0] + p_b[0]) / 4, (3 * p_a[1] + p_b[1]) / 4]
    expected = 2 * (0.75 * mean_p[0] + 0.25 * mean_p[1])
    assert plan.expert_ids.squeeze(1).tolist() == [0, 1, 0, 0]
    assert plan.losses["load_balance"].item() == pytest.approx(expected, rel=1e-6)
    assert plan.aux_loss.item() == pytest.approx(0.5 * expected, rel=1e-6)
    assert plan.gates.squeeze(1).tolist() == pytest.approx([p_a[0], p_b[1], p_a[0], p_a[0]], rel=1e-6)


def test_bilevel_two_level_loss_and_gate_product():
    router = BilevelRouter(2, 4, num_nodes=2, capacity_factor=None, aux_loss_weight=0.1, node_loss_weight=0.2)
    with torch.no_grad():
        router.node_proj.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        router.gpu_proj.weight.copy_(torch.tensor([[0.0, 3.0], [1.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    plan = router(x)
    # node gate as in the switch example; gpu logits: [1,0] -> [0, 1] (slot 1), [0,1] -> [3, 0] (slot 0)
    pn_a, pn_b = _p(2, 0), _p(0, 1)
    pg_a, pg_b = _p(0, 1), _p(3, 0)
    node_loss = 2 * (0.75 * (3 * pn_a[0] + pn_b[0]) / 4 + 0.25 * (3 * pn_a[1] + pn_b[1]) / 4)
    gpu_loss = 2 * (0.25 * (3 * pg_a[0] + pg_b[0]) / 4 + 0.75 * (3 * pg_a[1] + pg_b[1]) / 4)
    assert plan.expert_ids.squeeze(1).tolist() == [1, 2, 1, 1]  # node * 2 + slot
    assert plan.losses["load_balance_node"].item() == pytest.approx(node_loss, rel=1e-6)
    assert plan.losses["load_balance_gpu"].item() == pytest.approx(gpu_loss, rel=1e-6)
    assert plan.aux_loss.item() == pytest.approx(0.2 * node_loss + 0.1 * gpu_loss, rel=1e-6)
    assert plan.gates[0, 0].item() == pytest.approx(pn_a[0] * pg_a[1], rel=1e-6)
    assert sum(p.numel() for p in router.parameters()) == 2 * (2 + 2)  # d * (N + G*e)


def _skewed(router_cls, **kwargs):
    torch.manual_seed(0)
    router = router_cls(4, 8, capacity_factor=1.0, **kwargs)
    for p in router.parameters():
        with torch.no_grad():
            p.zero_()
            p[0] = 1.0  # every positive token prefers target 0 at every level
    return router


def test_skewed_switch_router_drops_all_but_one_capacity():
    router = _skewed(SwitchRouter)
    plan = router(torch.rand(64, 4) + 0.1)
    assert plan.capacity == 8  # 64 tokens / 8 experts
    assert torch.bincount(plan.expert_ids[plan.keep], minlength=8).tolist() == [8] + [0] * 7
    assert (1 - plan.keep.float().mean().item()) == pytest.approx(1 - 1 / 8)
    assert plan.keep[:8].all() and not plan.keep[8:].any()  # earlier tokens win


def test_skewed_bilevel_router_applies_capacity_per_level():
    router = _skewed(BilevelRouter, num_nodes=2)
    plan = router(torch.rand(64, 4) + 0.1)
    # node level keeps 32 of 64 (capacity 64/2), expert level keeps 8 of those (capacity 64/8)
    assert torch.bincount(plan.expert_ids[plan.keep], minlength=8).tolist() == [8] + [0] * 7
    assert (1 - plan.keep.float().mean().item()) == pytest.approx(1 - 8 / 64)


def test_bilevel_node_capacity_binds_before_expert_capacity():
    ids = torch.tensor([[0], [0], [0], [1]])
    keep = capacity_keep(ids, 2, capacity=2)
    assert keep.squeeze(1).tolist() == [True, True, False, True]


def test_topk_first_choices_have_priority_over_second():
    ids = torch.tensor([[1, 0], [0, 1], [0, 1]])  # expert 0: 2nd choice of t0, 1st of t1, t2
    keep = capacity_keep(ids, 2, capacity=2)
    assert keep.tolist() == [[True, False], [True, True], [True, False]]


def test_topk_gates_are_renormalised_and_k_copies():
    router = TopKRouter(6, 4, k=2, capacity_factor=None)
    plan = router(torch.randn(10, 6))
    assert plan.expert_ids.shape == (10, 2)
    assert torch.allclose(plan.gates.sum(1), torch.ones(10))
    assert (plan.expert_ids[:, 0] != plan.expert_ids[:, 1]).all()


def test_z_loss_and_jitter_options():
    torch.manual_seed(0)
    router = SwitchRouter(6, 4, z_loss_weight=1e-3, jitter_eps=0.1, aux_loss_weight=0.0)
    x = torch.randn(32, 6)
    logits = router.proj(x)
    expected_z = torch.logsumexp(logits, -1).square().mean()
    router.eval()
    plan = router(x)
    assert plan.losses["z"].item() == pytest.approx(expected_z.item(), rel=1e-5)
    assert plan.aux_loss.item() == pytest.approx(1e-3 * expected_z.item(), rel=1e-5)
    router.train()
    jittered = [router(x).losses["z"].item() for _ in range(2)]
    assert jittered[0] != jittered[1] != expected_z.item()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "switch", "k": 5}, "k=5"),
        ({"name": "topk", "capacity_factor": 0.0}, "capacity_factor"),
        ({"name": "topk", "capacity_factor": -1.0}, "capacity_factor"),
        ({"name": "bilevel", "num_nodes": 3}, "num_nodes=3"),
        ({"name": "bilevel", "num_nodes": 2, "k_node": 3}, "k_node"),
        ({"name": "mystery"}, "allowed: switch, topk, bilevel"),
    ],
)
def test_router_config_errors_name_the_field(kwargs, match):
    name, num_nodes = kwargs.pop("name"), kwargs.pop("num_nodes", 1)
    with pytest.raises(ValueError, match=match):
        build_router(MoEConfig(num_experts=4, router=name, **kwargs), 8, num_nodes)


def test_non_finite_logits_and_wrong_hidden_size_raise():
    router = SwitchRouter(8, 4)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        router(torch.full((3, 8), float("nan")))
    with pytest.raises(ValueError, match="d_model=8"):
        router(torch.randn(3, 7))
