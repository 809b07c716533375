"""Without a GPU, Triton kernels run in Triton's CPU interpreter (set before any triton import)."""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
