"""Per-group learning rates (ParamGroupConfig.lr_scale): two groups of one optimizer step with
their own lr (a prompt bank at 10x the backbone's)."""

from __future__ import annotations

import torch
from torch import nn

from smile.runtime.config import OptimizerConfig, ParamGroupConfig
from smile.runtime.optim import build_optimizer


def test_two_groups_step_with_their_own_learning_rates():
    torch.manual_seed(0)
    model = nn.ModuleDict({"backbone": nn.Linear(4, 4, bias=False), "bank": nn.Linear(4, 4, bias=False)})
    cfg = OptimizerConfig(type="sgd", lr=0.1, groups=[ParamGroupConfig(["bank.*"], lr_scale=10.0)])
    opt, _ = build_optimizer(model, [cfg])
    assert sorted(g["lr"] for g in opt.param_groups) == [0.1, 1.0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(8, 4)
    (model["backbone"](x).sum() + model["bank"](x).sum()).backward()
    opt.step()
    for name, lr in (("backbone.weight", 0.1), ("bank.weight", 1.0)):
        param = dict(model.named_parameters())[name]
        assert torch.allclose(before[name] - param.detach(), lr * param.grad, atol=1e-6)
