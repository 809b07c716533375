"""The denoiser: a BERT encoder over the noisy word vectors plus a timestep embedding, with a
linear head onto the vocabulary (the paper predicts the categorical distribution of x_0 at every
step). Its input block follows Diffusion-LM (up-projection with tanh, sinusoidal timestep MLP).

``moefy_bert`` swaps its FFNs for smile MoE layers. ``smile.hf.moefy`` does not know BERT's
two-module FFN (``intermediate`` = up-projection + activation, ``output`` = down-projection +
dropout + residual LayerNorm), so the swap lives here: ``intermediate`` becomes the whole expert
FFN and ``output.dense`` the identity, leaving the residual and LayerNorm as they were.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from transformers import BertConfig, BertModel

from smile.hf.moefy import MoEFeedForward
from smile.moe import MoEConfig, MoELayer, Topology


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class Denoiser(nn.Module):
    """f(x_t, t) -> logits over the vocabulary at every position."""

    def __init__(self, config: BertConfig, emb_dim: int, vocab_size: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        self.input_up_proj = nn.Sequential(nn.Linear(emb_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.time_embed = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.SiLU(), nn.Linear(4 * hidden, hidden)
        )
        self.bert = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        time = timestep_embedding(t, self.config.hidden_size).to(x_t.dtype)
        h = self.input_up_proj(x_t) + self.time_embed(time)[:, None]
        out = self.bert(inputs_embeds=h, attention_mask=attention_mask).last_hidden_state
        return self.head(out)


def bert_config(
    hidden: int, layers: int, heads: int, intermediate: int, dropout: float, max_len: int
) -> BertConfig:
    return BertConfig(
        vocab_size=1,  # the word embeddings are ours: BERT only sees inputs_embeds
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=max(max_len, 8),
    )


class _Identity(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def moefy_bert(model: BertModel, config: MoEConfig, topology: Topology | None = None) -> list[str]:
    """Swap the FFN of every ``config.every``-th BERT layer (HF's placement rule, as moefy) for a
    smile MoE layer of the same d_model / d_ff; returns the replaced layers' names."""
    topology = topology or Topology(1, 1)
    config.validate()
    config.check_topology(topology)
    bert = model.config
    act = bert.hidden_act if bert.hidden_act in ("gelu", "relu") else "gelu"
    layer_config = dataclasses.replace(
        config,
        d_model=bert.hidden_size,
        d_ff=bert.intermediate_size,
        activation=config.resolved_activation(act),
    )
    replaced = []
    for i, layer in enumerate(model.encoder.layer):
        if config.every == 1 or i % config.every == 1:
            layer.intermediate = MoEFeedForward(MoELayer(layer_config, topology=topology))
            layer.output.dense = _Identity()
            replaced.append(f"encoder.layer.{i}")
    if not replaced:
        raise ValueError(
            f"moe.every={config.every} selects no layer of a {len(model.encoder.layer)}-layer denoiser"
        )
    return replaced
