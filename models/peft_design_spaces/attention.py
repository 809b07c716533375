"""Prefix tuning on stock transformers attention, through transformers' attention registry.

RoBERTa and T5 self-attention call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with the module itself, its projected queries/keys/values and a 4-D additive mask. Registering
one function under :data:`ATTENTION_NAME` (and eager-style masks for it) lets a module that
carries a ``peft_prefix`` prepend its prefix keys/values, widening the mask (and T5's relative
position bias) with zeros so every query sees the prefix. Modules without a prefix (cross
attention, untuned layers) compute plain attention. No modeling code is copied or patched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ATTENTION_NAME = "smile_peft_prefix"
PREFIX_ATTR = "peft_prefix"


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over ``[prefix; keys]`` (``query/key/value`` are ``[B, heads, T, head_dim]``)."""
    mask = _float_mask(attention_mask, query.dtype)
    prefix = getattr(module, PREFIX_ATTR, None)
    if prefix is not None and prefix.enabled:
        prefix_key, prefix_value = prefix.expand(query.shape[0], key.dtype)
        key = torch.cat([prefix_key, key], dim=2)
        value = torch.cat([prefix_value, value], dim=2)
        if mask is not None:
            mask = F.pad(mask, (prefix.length, 0), value=0.0)
        if position_bias is not None:
            position_bias = F.pad(position_bias, (prefix.length, 0), value=0.0)
    if position_bias is not None:
        mask = position_bias if mask is None else mask + position_bias
    if mask is not None:
        mask = mask.to(query.dtype)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=float(dropout), scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, prefix_attention)
AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
