"""Where and how fast a run computes, in one place for the training loop and the throughput benchmark: the
device, the autocast dtype, TF32 matmuls and which scaled-dot-product-attention kernel runs."""

from __future__ import annotations

import torch

from training.config import ConfigError, RunConfig


def pick_device(name: str | None, what: str = "--device") -> torch.device:
    """A device to run on: `name` (cuda, cuda:1, cpu, mps), or CUDA when there is one; one that is not there
    is a ConfigError naming `what`."""
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{what} {name!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} is {name!r} but no CUDA device is visible")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"{what} is {name!r} but only {torch.cuda.device_count()} CUDA devices are visible"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{what} is {name!r} but MPS is not available")
    return dev


def resolve_device(cfg: RunConfig) -> torch.device:
    return pick_device(cfg.train.device, "train.device")


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA unless the config says float32; None = no autocast."""
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return torch.bfloat16 if dtype == "bfloat16" else None


ATTENTION_BACKENDS = ("flash", "cudnn", "efficient", "math")


def configure(device: torch.device, *, tf32: bool, attention: str = "auto") -> None:
    """Process-wide switches (PyTorch keeps them global). `attention` other than "auto" enables that SDPA
    backend alone, so a measurement of it can never silently fall back to another. "fa4" leaves SDPA for
    FlashAttention-4 (training/kernels/flash_attention4.py), which the model calls itself."""
    if device.type != "cuda":
        if attention != "auto":
            raise ConfigError(
                f"train.attention={attention!r} picks a CUDA kernel; the device is {device.type}"
            )
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if attention == "fa4":
        attention = "auto"
    if attention not in ("auto", *ATTENTION_BACKENDS):
        raise ConfigError(
            f"train.attention={attention!r}: expected auto or one of {', '.join(ATTENTION_BACKENDS)}"
        )
    on = set(ATTENTION_BACKENDS) if attention == "auto" else {attention}
    torch.backends.cuda.enable_flash_sdp("flash" in on)
    torch.backends.cuda.enable_cudnn_sdp("cudnn" in on)
    torch.backends.cuda.enable_mem_efficient_sdp("efficient" in on)
    torch.backends.cuda.enable_math_sdp("math" in on)
    # torch.compile's on-disk caches (AOTAutograd's, Inductor's) key on the traced graph and the matmul
    # settings, not on these switches: a graph compiled earlier under "auto" would be served again with its
    # kernel baked in, so a forced kernel compiles afresh.
    _compile_caches(enabled=attention == "auto")


_CACHE_DEFAULTS: tuple[bool, bool] | None = None


def _compile_caches(enabled: bool) -> None:
    global _CACHE_DEFAULTS
    from torch._functorch import config as aot_config
    from torch._inductor import config as inductor_config

    if (
        _CACHE_DEFAULTS is None
    ):  # what the environment chose (TORCHINDUCTOR_* variables), restored on "auto"
        _CACHE_DEFAULTS = (aot_config.enable_autograd_cache, inductor_config.fx_graph_cache)
    aot_config.enable_autograd_cache = enabled and _CACHE_DEFAULTS[0]
    inductor_config.fx_graph_cache = enabled and _CACHE_DEFAULTS[1]
