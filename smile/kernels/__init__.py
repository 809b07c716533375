"""Fused dispatch kernels behind smile.dispatch: Triton (``TritonBackend``) and CUDA (``cuda.CudaBackend``).

``TritonBackend`` is resolved lazily, so ``smile.kernels.cuda`` stays importable without triton;
``from smile.kernels import TritonBackend`` raises ImportError when triton is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smile.kernels.triton_dispatch import TritonBackend

__all__ = ["TritonBackend"]


def __getattr__(name: str):
    if name == "TritonBackend":
        from smile.kernels.triton_dispatch import TritonBackend

        return TritonBackend
    raise AttributeError(f"module 'smile.kernels' has no attribute {name!r}")
