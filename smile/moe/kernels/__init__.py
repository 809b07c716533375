"""Dispatch ops behind the token dispatcher: the torch reference, Triton and CUDA kernels.

:func:`get_backend` picks one. ``TritonBackend`` is resolved lazily, so ``smile.moe.kernels.cuda``
stays importable without triton; ``from smile.moe.kernels import TritonBackend`` raises
ImportError when triton is missing.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import torch

from smile.moe.kernels.reference import DispatchBackend, TorchBackend

if TYPE_CHECKING:
    from smile.moe.kernels.triton_dispatch import TritonBackend

__all__ = ["BACKENDS", "DispatchBackend", "TorchBackend", "TritonBackend", "get_backend"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "cuda")
_TORCH = TorchBackend()


def __getattr__(name: str):
    if name == "TritonBackend":
        from smile.moe.kernels.triton_dispatch import TritonBackend

        return TritonBackend
    raise AttributeError(f"module 'smile.moe.kernels' has no attribute {name!r}")


@functools.cache
def _load_backend(name: str) -> DispatchBackend | None:
    """The backend, or None (logged once: the answer is cached, the layer asks every step)."""
    if name == "torch":
        return _TORCH
    try:
        if name == "triton":
            from smile.moe.kernels.triton_dispatch import TritonBackend

            return TritonBackend()
        if name == "cuda":
            from smile.moe.kernels.cuda import CudaBackend

            return CudaBackend()
    except (ImportError, RuntimeError, OSError) as err:
        log.warning("smile dispatch: %s backend unavailable (%s); falling back", name, err)
    return None


def get_backend(name: str = "auto", device: torch.device | None = None) -> DispatchBackend:
    """Pick a backend: ``auto`` prefers cuda > triton > torch for CUDA tensors, torch on CPU."""
    if name not in BACKENDS:
        raise ValueError(f"dispatch backend {name!r} unknown; allowed: {', '.join(BACKENDS)}")
    if name != "auto":
        backend = _load_backend(name)
        if backend is None:
            raise RuntimeError(f"dispatch backend {name!r} requested but not available")
        return backend
    if device is not None and device.type == "cuda":
        for candidate in ("cuda", "triton"):
            backend = _load_backend(candidate)
            if backend is not None:
                return backend
    return _TORCH
