"""Where and how fast a run computes, in one place for the training loop and the throughput benchmark: the
device, the autocast dtype, TF32 matmuls and which scaled-dot-product-attention kernel runs."""

from __future__ import annotations

import torch

from training.config import ConfigError, RunConfig


def resolve_device(cfg: RunConfig) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(want)


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA unless the config says float32; None = no autocast."""
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return torch.bfloat16 if dtype == "bfloat16" else None

ATTENTION_BACKENDS = ("flash", "cudnn", "efficient", "math")


def configure(device: torch.device, *, tf32: bool, attention: str = "auto") -> None:
    """Process-wide switches (PyTorch keeps them global). `attention` other than "auto" enables that SDPA
    backend alone, so a measurement of it can never silently fall back to another."""
    if device.type != "cuda":
        if attention != "auto":
            raise ConfigError(f"train.attention={attention!r} picks a CUDA kernel; the device is {device.type}")
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if attention not in ("auto", *ATTENTION_BACKENDS):
        raise ConfigError(f"train.attention={attention!r}: expected auto or one of {', '.join(ATTENTION_BACKENDS)}")
    on = set(ATTENTION_BACKENDS) if attention == "auto" else {attention}
    torch.backends.cuda.enable_flash_sdp("flash" in on)
    torch.backends.cuda.enable_cudnn_sdp("cudnn" in on)
    torch.backends.cuda.enable_mem_efficient_sdp("efficient" in on)
    torch.backends.cuda.enable_math_sdp("math" in on)
