"""The four PEFT strategies as modules that attach to a frozen stock transformers model.

* LoRA is a weight parametrization ``W -> W + (alpha / r) * delta`` with a low-rank ``delta``
  and a zero-initialised factor B, so it reaches any weight tensor: ``nn.Linear`` weights
  (``[out, in]``) and the batched weights of smile expert FFNs (``[experts, in, out]``, one
  low-rank delta per expert), and merges into the weight exactly.
* Adapter is a bottleneck ``h + up(act(down(h)))`` after the FFN, ``up`` zero-initialised.
* Prefix holds P learned key/value positions for one self-attention (see ``attention.py``),
  optionally produced by a shared MLP during training (Li & Liang 2021) and folded afterwards.
* BitFit trains bias terms; where a linear layer has none (T5) a zero bias is added.

Every strategy except prefix leaves the model's function unchanged at initialisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from smile.moe.experts import mark_expert_parameter

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


class LoRA(nn.Module):
    """Low-rank update of one weight, registered with ``torch.nn.utils.parametrize``.

    A 2-D weight ``[out, in]`` gets ``B [out, r] @ A [r, in]``; a 3-D batched expert weight
    ``[e, in, out]`` (used as ``x @ W[e]``) gets ``A [e, in, r] @ B [e, r, out]``, marked as
    expert parameters so they live and are reduced with their experts.
    """

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, expert: bool = False) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.scale = rank, alpha / rank
        kw = {"dtype": torch.float32, "device": weight.device}
        if weight.dim() == 2:
            out_features, in_features = weight.shape
            self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
            self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif weight.dim() == 3:
            experts, in_features, out_features = weight.shape
            self.lora_A = nn.Parameter(torch.randn(experts, in_features, rank, **kw) / math.sqrt(in_features))
            self.lora_B = nn.Parameter(torch.zeros(experts, rank, out_features, **kw))
        else:
            raise ValueError(f"LoRA adapts 2-D or 3-D weights, got shape {tuple(weight.shape)}")
        if expert:
            mark_expert_parameter(self.lora_A)
            mark_expert_parameter(self.lora_B)

    def delta(self) -> torch.Tensor:
        if self.lora_A.dim() == 2:
            return self.scale * (self.lora_B @ self.lora_A)
        return self.scale * torch.bmm(self.lora_A, self.lora_B)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def add_lora(module: nn.Module, name: str, rank: int, alpha: float, expert: bool) -> LoRA:
    """Parametrize ``module.<name>`` with a LoRA update (the original stays frozen)."""
    lora = LoRA(getattr(module, name), rank, alpha, expert=expert)
    parametrize.register_parametrization(module, name, lora)
    return lora


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its weight (inference); returns how many were merged."""
    merged = 0
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations):
            if any(isinstance(p, LoRA) for p in module.parametrizations[name]):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                merged += 1
    return merged


class Adapter(nn.Module):
    """Bottleneck adapter ``h + up(act(down(h)))`` (Houlsby et al. 2019), identity at init."""

    def __init__(self, d_model: int, bottleneck: int, activation: str = "relu") -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be >= 1, got {bottleneck}")
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        self.act = _ACTIVATIONS[activation]
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


class WithAdapter(nn.Module):
    """Runs a (frozen) FFN sub-module, then an adapter on its output (first element of a tuple)."""

    def __init__(self, inner: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


class PrefixMLP(nn.Module):
    """Reparameterisation shared by all prefix layers: ``Linear -> tanh -> Linear`` to keys and values."""

    def __init__(self, d_model: int, hidden: int, kv_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(), nn.Linear(hidden, 2 * kv_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Prefix(nn.Module):
    """P learned key/value positions prepended to one self-attention's keys and values.

    With a :class:`PrefixMLP` the layer learns a ``[P, d_model]`` input that the shared MLP maps
    to keys and values (training-time only); :meth:`fold` stores the result as plain key/value
    parameters, which is what inference keeps and what the budget counts.
    """

    def __init__(
        self, length: int, num_heads: int, head_dim: int, d_model: int, mlp: PrefixMLP | None
    ) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"prefix length must be >= 1, got {length}")
        self.length, self.num_heads, self.head_dim = length, num_heads, head_dim
        self.enabled = True
        self._mlp = (mlp,)  # a reference, not a submodule: the MLP is registered once, on the model
        if mlp is not None:
            self.embedding = nn.Parameter(torch.randn(length, d_model))
        else:
            self.key = nn.Parameter(torch.randn(length, num_heads * head_dim) * 0.02)
            self.value = nn.Parameter(torch.randn(length, num_heads * head_dim) * 0.02)

    @property
    def reparameterised(self) -> bool:
        return self._mlp[0] is not None

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, each ``[P, heads * head_dim]``."""
        if self.reparameterised:
            kv = self._mlp[0](self.embedding.to(self._mlp[0].net[0].weight.dtype))
            return kv.chunk(2, dim=-1)
        return self.key, self.value

    def expand(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as ``[batch, heads, P, head_dim]`` for the attention function."""
        key, value = self.key_value()

        def shape(t: torch.Tensor) -> torch.Tensor:
            t = t.view(self.length, self.num_heads, self.head_dim).transpose(0, 1)
            return t.unsqueeze(0).expand(batch, -1, -1, -1).to(dtype)

        return shape(key), shape(value)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP reparameterisation by the keys and values it currently produces."""
        if not self.reparameterised:
            return
        key, value = (t.detach().clone().float() for t in self.key_value())
        del self.embedding
        self._mlp = (None,)
        self.key = nn.Parameter(key)
        self.value = nn.Parameter(value)


def add_bias(linear: nn.Linear) -> nn.Parameter:
    """Give a bias-free linear layer a zero bias (BitFit on T5); identity at init."""
    if linear.bias is not None:
        return linear.bias
    weight = linear.weight
    linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    return linear.bias
