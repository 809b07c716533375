"""Single-process checks of the MoE layer, dispatch reference, topology and their errors."""

from __future__ import annotations

import pytest
import torch

from smile.moe.dispatcher import permute, unpermute_combine
from smile.moe.exchange import regroup_index
from smile.moe.kernels import TorchBackend, get_backend
from smile.moe.layer import MoELayer
from smile.moe.routing import capacity_keep
from smile.moe.topology import Topology


def test_dispatch_index_layout_dropless():
    ids = torch.tensor([[2, 0], [0, 1], [2, 2]])
    keep = torch.tensor([[True, True], [False, True], [True, True]])
    backend = TorchBackend()
    dest, src, counts = backend.dispatch_index(ids, keep, 3)
    assert counts.tolist() == [1, 1, 3]
    # expert 0: (t0,j1); expert 1: (t1,j1); expert 2: (t0,j0), (t2,j0), (t2,j1)
    assert dest.tolist() == [[2, 0], [-1, 1], [3, 4]]
    assert src.tolist() == [0, 1, 0, 2, 2]


def test_permute_and_combine_gradients_are_exact():
    torch.manual_seed(0)
    backend = TorchBackend()
    ids = torch.randint(0, 4, (6, 2))
    keep = capacity_keep(ids, 4, 3) & (torch.rand(6, 2) > 0.2)
    dest, src, _ = backend.dispatch_index(ids, keep, 4)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)

    def f(x, gates):
        return unpermute_combine(permute(x, src, dest, backend) * 1.5, gates, dest, src, backend)

    torch.autograd.gradcheck(f, (x, gates))


def test_regroup_index_moves_variable_blocks():
    counts = torch.tensor([[1, 2], [0, 3]])  # blocks a(1) b(2) | c(0) d(3) -> order a c b d
    index = regroup_index(counts, (1, 0))
    assert index.tolist() == [0, 1, 2, 3, 4, 5]
    counts = torch.tensor([[2, 1], [1, 0]])  # rows: a a b c -> a a c b
    assert regroup_index(counts, (1, 0)).tolist() == [0, 1, 3, 2]


def test_layer_errors_name_the_problem():
    with pytest.raises(ValueError, match="must be a multiple of the expert-parallel size 4"):
        MoELayer(8, 16, 6, topology=Topology(2, 2, rank=0))
    with pytest.raises(ValueError, match="d_model=8"):
        MoELayer(8, 16, 4)(torch.randn(3, 9))
    with pytest.raises(ValueError, match="dispatcher 'local'"):
        MoELayer(8, 16, 4, dispatcher="local", topology=Topology(1, 2, rank=0))
    with pytest.raises(ValueError, match="allowed: auto, flat, hierarchical, local"):
        MoELayer(8, 16, 4, dispatcher="ring")
    with pytest.raises(ValueError, match="moe.transport 'ring' unknown; allowed: collective, p2p"):
        MoELayer(8, 16, 4, transport="ring")
    with pytest.raises(ValueError, match="allowed: auto, torch, triton, cuda"):
        get_backend("fast")


def test_topology_errors_and_coordinates(monkeypatch):
    # torchrun's variables, not a process group another test may have left in this process
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="sim_nodes=2 does not tile the world size 1"):
        Topology.from_env(sim_nodes=2)
    with pytest.raises(ValueError, match="gpus_per_node must be a positive int"):
        Topology(2, 0)
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="sim_nodes=4 does not tile the world size 6"):
        Topology.from_env(sim_nodes=4)
    topo = Topology.from_env(sim_nodes=3)
    assert (topo.nodes, topo.gpus_per_node, topo.node, topo.local_rank) == (3, 2, 2, 0)
    assert topo.group_ranks("inter") == [0, 2, 4]
    assert topo.group_ranks("intra") == [4, 5]
    replicated = Topology(4, 2, rank=5, ep_nodes=2)
    assert replicated.group_ranks("ep") == [4, 5, 6, 7]
    assert replicated.group_ranks("inter") == [5, 7]
    assert replicated.group_ranks("edp") == [1, 5]


def test_same_seed_gives_same_experts_on_any_topology():
    torch.manual_seed(7)
    whole = MoELayer(8, 16, 4)
    torch.manual_seed(7)
    part = MoELayer(8, 16, 4, dispatcher="flat", topology=Topology(1, 2, rank=1))
    assert torch.equal(whole.experts.w_in[2:], part.experts.w_in)
    assert torch.equal(whole.router.proj.weight, part.router.proj.weight)


def test_stats_report_drops_and_tokens_per_expert():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, capacity_factor=0.5)
    layer(torch.randn(32, 8))
    stats = layer.last_stats
    assert stats.tokens_per_expert.sum().item() == round(32 * (1 - stats.dropped_fraction))
    assert stats.dropped_fraction >= 0.5
    assert set(stats.losses) == {"load_balance", "z"}
