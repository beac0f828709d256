"""Kernels of our own for the memory-bound part of the step, each behind a switch whose default is PyTorch's
path (the switches are `train.*` fields; tests hold each kernel to that path, on CPU under Triton's
interpreter, TRITON_INTERPRET=1, and on a GPU):

- add_layernorm.py: a residual add and the LayerNorm after it (`train.fused_add_layernorm`);
- classifier.py: the loss's softmax, cross-entropy and logit gradient (`train.fused_classifier`).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the switches say so before anything runs (training/train.py: check_kernels)
    triton = None
    tl = None


def available(device: torch.device) -> str | None:
    """None when our kernels can run on `device`, else why not."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1), not on {device.type}"
    return None
