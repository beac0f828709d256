"""FlashAttention-4 (the `flash-attn-4` package: CuTe DSL kernels for Hopper and Blackwell GPUs) as the
attention of `train.attention=fa4`, in place of SDPA's kernels.

It takes q, k and v as (B, T, heads, head_dim), the layout the attention's projection already gives, so no
transposed copies are made on the way in or out. CuTe DSL compiles its kernels itself at the first call, which
torch.compile cannot trace: the call is left out of the compiled graph (one graph break per layer, which the
lever's measurement includes). The package brings its own backward.
"""

from __future__ import annotations

import torch

__all__ = ["attention", "available"]


def available(device: torch.device) -> str | None:
    """None when FlashAttention-4 can run on `device`, else why not."""
    if device.type != "cuda":
        return f"FlashAttention-4 runs on Hopper and Blackwell GPUs, not on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"FlashAttention-4 runs on Hopper (sm90) and Blackwell (sm100) GPUs; this one is sm{major}{minor}"
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        return "the flash-attn-4 package is not installed (pip install flash-attn-4)"
    return None


@torch.compiler.disable
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of (B, T, heads, head_dim) q, k, v: the output in the same layout."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v, causal=True)
    return out[0] if isinstance(out, tuple) else out  # some releases return (out, log-sum-exp)
