"""The classifier's softmax, cross-entropy and logit gradient in one Triton kernel (llm.c's fused classifier).

After the lm_head's matmul, PyTorch's ops pass over a chunk's (tokens x vocab) logits about ten times: the cast
to fp32, the soft-cap's division, tanh and product, the padding's -inf, the log-sum-exp, then exp, the one-hot
subtraction, the division by the token count, the soft-cap's derivative and the cast back. Here one program per
row reads its logits twice (an online log-sum-exp, then the gradient) and writes the gradient once, in place
of the logits and in their dtype: the memory-bound part of the loss at a fifth of the traffic.

Used by training/chunked_loss.py when `train.fused_classifier` is on; held to its PyTorch ops by
tests/unit/test_kernels.py under Triton's interpreter and by tests/e2e/test_gpu.py on a GPU.

    loss_rows = classify_(logits, targets, vocab_size, softcap, grad_scale)   # logits now hold the gradient
"""

from __future__ import annotations

import torch

from training.kernels import available, tl, triton

__all__ = ["available", "classify_"]

_BLOCK = 4096  # columns per iteration: 50304 logits in 13 (fewer registers than one block of the whole row)


if triton is not None:

    @triton.jit
    def _tanh(y):
        """tanh as 2 sigmoid(2y) - 1: Triton has no tanh of its own on every backend (the interpreter's)."""
        return 2.0 * tl.sigmoid(2.0 * y) - 1.0

    @triton.jit
    def _classify(
        L,
        T,
        Loss,
        row_stride,
        V,
        VP,
        grad_scale,
        softcap,
        BLOCK: tl.constexpr,
        SOFTCAP: tl.constexpr,
        GRAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = L + row * row_stride
        # pass 1: the log-sum-exp over the real vocabulary, by a running maximum and a rescaled sum
        m = -float("inf")
        s = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            if SOFTCAP:
                x = softcap * _tanh(x / softcap)
            x = tl.where(cols < V, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(T + row)
        target = tl.load(base + t).to(tl.float32)
        if SOFTCAP:
            target = softcap * _tanh(target / softcap)
        tl.store(Loss + row, lse - target)
        if GRAD:
            # pass 2: (softmax - onehot) * grad_scale, times the soft-cap's derivative 1 - tanh^2; the padded
            # columns take none
            for start in range(0, VP, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < VP, other=0.0).to(tl.float32)
                th = x
                if SOFTCAP:
                    th = _tanh(x / softcap)
                    x = softcap * th
                p = tl.where(cols < V, tl.exp(x - lse), 0.0)
                g = (p - tl.where(cols == t, 1.0, 0.0)) * grad_scale
                if SOFTCAP:
                    g = g * (1.0 - th * th)
                tl.store(base + cols, g.to(L.dtype.element_ty), mask=cols < VP)


def classify_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    softcap: float = 0.0,
    grad_scale: float | None = None,
) -> torch.Tensor:
    """Each row's cross-entropy (fp32, (rows,)) of `logits` (rows x padded vocab, any float dtype; the first
    `vocab_size` columns are tokens, the rest padding) against `targets`, soft-capped first when `softcap` > 0.

    With `grad_scale`, the logits are overwritten with d(loss_rows.sum() * grad_scale) / d logits, in their own
    dtype (the padding's columns with 0)."""
    rows, vp = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("classify_ needs rows of contiguous logits")
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return loss
    _classify[(rows,)](
        logits,
        targets.contiguous(),
        loss,
        logits.stride(0),
        vocab_size,
        vp,
        float(grad_scale or 0.0),
        float(softcap),
        BLOCK=min(_BLOCK, triton.next_power_of_2(vp)),
        SOFTCAP=bool(softcap),
        GRAD=grad_scale is not None,
    )
    return loss
