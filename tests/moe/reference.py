"""Dense single-process reference of an MoE layer, used by the exactness tests."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from smile.moe.layer import MoELayer


def build_layer(topo, seed: int, d_model: int, d_ff: int, **options) -> MoELayer:
    """A layer with 2 experts per rank; every rank seeds alike, so all build the same model."""
    torch.manual_seed(seed)
    return MoELayer(d_model, d_ff, 2 * topo.ep_size, topology=topo, **options)


def gather_experts(layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts' weights of the EP group, ordered by global expert id."""
    out = []
    for weight in (layer.experts.w_in, layer.experts.w_out):
        w = weight.detach()
        if dist.is_initialized() and layer.topology.ep_size > 1:
            parts = [torch.empty_like(w) for _ in range(layer.topology.ep_size)]
            dist.all_gather(parts, w.contiguous(), group=layer.topology.group("ep"))
            w = torch.cat(parts)
        out.append(w.clone())
    return out[0], out[1]


def dense_forward_backward(
    layer: MoELayer, x: torch.Tensor, upstream: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every kept copy through its expert times its gate, computed densely on one rank.

    Returns the output, the input/router gradients of this rank's tokens, and the gradients of
    this rank's local experts summed over all ranks' tokens (as expert parallelism computes them).
    """
    w_in, w_out = (w.requires_grad_() for w in gather_experts(layer))
    router = copy.deepcopy(layer.router)
    x = x.detach().clone().requires_grad_()
    plan = router(x)
    weight = (plan.gates * plan.keep).unsqueeze(-1)  # [T, k, 1]
    h = torch.einsum("td,tkdf->tkf", x, w_in[plan.expert_ids])
    h = layer.experts._act(h)
    y = torch.einsum("tkf,tkfd->tkd", h, w_out[plan.expert_ids])
    out = (y * weight).sum(1)
    ((out * upstream).sum() + plan.aux_loss).backward()
    grads = {"out": out.detach(), "x": x.grad, "dropped": torch.tensor(1.0 - plan.keep.float().mean().item())}
    for name, p in router.named_parameters():
        grads[f"router.{name}"] = p.grad
    e = layer.dispatcher.num_local
    first = layer.topology.ep_rank * e
    for name, w in (("w_in", w_in), ("w_out", w_out)):
        g = w.grad
        if dist.is_initialized() and layer.topology.ep_size > 1:
            dist.all_reduce(g, group=layer.topology.group("ep"))
        grads[f"experts.{name}"] = g[first : first + e]
    return grads


def layer_forward_backward(
    layer: MoELayer, x: torch.Tensor, upstream: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The same quantities from the layer under test."""
    x = x.detach().clone().requires_grad_()
    out, aux = layer(x)
    ((out * upstream).sum() + aux).backward()
    grads = {"out": out.detach(), "x": x.grad, "dropped": torch.tensor(layer.last_stats.dropped_fraction)}
    for name, p in layer.router.named_parameters():
        grads[f"router.{name}"] = p.grad
    grads["experts.w_in"] = layer.experts.w_in.grad
    grads["experts.w_out"] = layer.experts.w_out.grad
    return grads
