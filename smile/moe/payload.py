"""Wire formats for All2All payloads: exact, bf16, or fp8 (e4m3) with one scale per token.

Inter-node bytes decide a bandwidth-bound MoE step; sending the dispatch payload in fp8 (as
DeepEP does) quarters them versus fp32. A codec encodes rows to a ``uint8`` matrix (so any
backend, gloo included, can move it) and decodes on arrival; gradients pass straight through.
"""

from __future__ import annotations

from typing import Protocol

import torch

from smile.moe.config import PAYLOADS, check_choice

FP8_MAX = 448.0  # largest finite float8_e4m3fn


class PayloadCodec(Protocol):
    name: str

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, wire: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...


class ExactCodec:
    """Rows travel in their own dtype."""

    name = "exact"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, wire: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return wire


class BF16Codec:
    name = "bf16"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).contiguous().view(torch.uint8)

    def decode(self, wire: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return wire.contiguous().view(torch.bfloat16).to(dtype)


class FP8Codec:
    """e4m3 values scaled per row so each row's largest magnitude maps to 448; scale in fp32.

    A row of ``d`` values travels as ``d + 4`` bytes.
    """

    name = "fp8"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        scale = (x.detach().abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-30)
        values = (x.float() / scale).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat([values, scale.view(torch.uint8)], dim=1)

    def decode(self, wire: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        values = wire[:, :-4].contiguous().view(torch.float8_e4m3fn)
        scale = wire[:, -4:].contiguous().view(torch.float32)
        return (values.float() * scale).to(dtype)


def get_codec(name: str) -> PayloadCodec:
    check_choice("payload", name, PAYLOADS)
    return {"exact": ExactCodec, "bf16": BF16Codec, "fp8": FP8Codec}[name]()
