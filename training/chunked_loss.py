"""lm_head + cross-entropy over chunks of tokens, so the (tokens x vocab) logits never exist all at once.

At B=64, T=1024 the logits are 65,536 x 50,257: 6.6 GB in bf16 and 13 GB once cross-entropy upcasts them to
fp32, written and re-read several times per step, plus the same again for their gradient. Here each chunk's
logits live only long enough to give that chunk's loss and its gradients (the approach of Liger-Kernel's
fused linear cross-entropy): the forward pass also computes d loss / d hidden and d loss / d lm_head, and the
backward pass only scales them. Same matmuls, same FLOPs; peak memory drops by the logits, which buys a
larger micro-batch. The matmuls keep the padded vocabulary (50304: the friendly shape padding is for); the
padded columns are set to -inf before the softmax, so, as in `GPT.forward`, they take no probability and get
no gradient. A logit soft-cap (cap * tanh(logits / cap)) is applied per chunk before the padding's -inf, and its
derivative (1 - (capped / cap)^2) is folded into the chunk's gradient.

With `fused`, all of that after the matmul is one Triton kernel that overwrites the chunk's logits with their
gradient (training/kernels/classifier.py, llm.c's fused classifier).
"""

from __future__ import annotations

import torch

__all__ = ["chunked_linear_cross_entropy"]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        vocab_size: int,
        chunk: int,
        dtype: torch.dtype,
        softcap: float,
        fused: bool,
    ):
        n = hidden.size(0)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_grad
            else None
        )
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk].to(dtype)
            t = targets[start : start + chunk]
            if fused:
                from training.kernels.classifier import classify_

                g = h @ w.t()  # the logits, and once classify_ is done, their gradient
                loss += classify_(g, t, vocab_size, softcap, 1.0 / n if need_grad else None).sum()
            else:
                logits = (h @ w.t()).float()  # as autocast: bf16 matmul, cross-entropy in fp32
                capped = None
                if softcap:
                    logits = logits.div_(softcap).tanh_()
                    capped = logits.clone() if need_grad else None  # tanh, for the derivative
                    logits = logits.mul_(softcap)
                # padding is not a token: exp(-inf) = 0, no mass, no gradient
                logits[:, vocab_size:] = float("-inf")
                lse = torch.logsumexp(logits, dim=-1)
                loss += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
                if need_grad:
                    # d mean(CE) / d logits = (softmax - onehot) / n, computed in place of the logits
                    g = logits.sub_(lse.unsqueeze(1)).exp_()
                    g.scatter_add_(1, t.unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
                    g = g.div_(n)
                    if capped is not None:  # d cap*tanh(a/cap) / da = 1 - tanh^2; padding's is 0
                        g = g.mul_(capped.square_().neg_().add_(1.0))
                    g = g.to(dtype)
            if grad_hidden is not None and grad_weight is not None:
                grad_hidden[start : start + chunk] = (g @ w).to(hidden.dtype)
                grad_weight += (g.t() @ h).float()
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss,
            (grad_weight * grad_loss).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    chunk: int,
    softcap: float = 0.0,
    fused: bool = False,
) -> torch.Tensor:
    """mean(cross_entropy(hidden @ weight[:vocab_size].T, targets)) with `chunk` tokens of logits at a time;
    with `softcap` > 0 the logits are softcap * tanh(logits / softcap) first. `fused`: the softmax and the
    gradient by our Triton kernel (training/kernels/classifier.py) instead of PyTorch's ops.

    hidden: (N, C); weight: (V_padded, C); targets: (N,) token ids < vocab_size. Under autocast the matmuls
    run in the autocast dtype and the softmax in fp32, as the plain path does.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):  # the dtypes above are chosen explicitly
        return _ChunkedLinearCrossEntropy.apply(
            hidden, weight, targets, vocab_size, chunk, dtype, float(softcap), fused
        )
