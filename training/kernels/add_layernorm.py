"""Residual add + LayerNorm in one Triton kernel, forward and backward: `s = x + h; y = LayerNorm(s)`.

In a pre-norm block the residual stream is read, added to and normalised twice per layer; apart the add writes
s and the LayerNorm reads it back, and their backwards do the same with the gradients. Fused, each row is read
once and both outputs written once; the backward adds the stream's own gradient into the LayerNorm's
(the residual's gradient flows to both x and h unchanged). The weight and bias gradients are summed per block
of rows in the kernel and over the blocks by PyTorch (no atomics: the same result every run).

    s, y = add_layernorm(x, h, ln)      # ln: the nn.LayerNorm whose weight, bias and eps are used
"""

from __future__ import annotations

import torch
import torch.nn as nn

from training.kernels import available, tl, triton

__all__ = ["add_layernorm", "add_layernorm_reference", "available"]


if triton is not None:

    @triton.jit
    def _forward(X, H, S, Y, W, B, Mean, Rstd, C, eps, BLOCK: tl.constexpr, HAS_H: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        s = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_H:
            s += tl.load(H + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(S + row * C + cols, s, mask=mask)
        mean = tl.sum(s, axis=0) / C
        d = tl.where(mask, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
        w = tl.load(W + cols, mask=mask).to(tl.float32)
        b = tl.load(B + cols, mask=mask).to(tl.float32)
        tl.store(Y + row * C + cols, d * rstd * w + b, mask=mask)
        tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)

    @triton.jit
    def _backward(
        S,
        DY,
        DS,
        DX,
        DW,
        DB,
        W,
        Mean,
        Rstd,
        N,
        C,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_DS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        w = tl.load(W + cols, mask=mask).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        db = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(ROWS):
            row = pid * ROWS + i
            if row < N:
                s = tl.load(S + row * C + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * C + cols, mask=mask, other=0.0).to(tl.float32)
                mean = tl.load(Mean + row)
                rstd = tl.load(Rstd + row)
                xhat = tl.where(mask, (s - mean) * rstd, 0.0)
                wdy = tl.where(mask, w * dy, 0.0)
                c1 = tl.sum(xhat * wdy, axis=0) / C
                c2 = tl.sum(wdy, axis=0) / C
                dx = (wdy - (xhat * c1 + c2)) * rstd
                if HAS_DS:
                    dx += tl.load(DS + row * C + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * C + cols, dx, mask=mask)
                dw += dy * xhat
                db += dy
        tl.store(DW + pid * C + cols, dw, mask=mask)
        tl.store(DB + pid * C + cols, db, mask=mask)


_ROWS = 16  # rows per program of the backward: the weight and bias gradients' partial sums


def _ln_forward(x2, h2, weight, bias, eps):
    """(s, y, mean, rstd) of rows x2 (+ h2 when given)."""
    N, C = x2.shape
    s = torch.empty_like(x2) if h2 is not None else x2
    y = torch.empty_like(x2)
    mean = torch.empty(N, device=x2.device, dtype=torch.float32)
    rstd = torch.empty(N, device=x2.device, dtype=torch.float32)
    block = triton.next_power_of_2(C)
    has_h = h2 is not None
    _forward[(N,)](
        x2, h2 if has_h else x2, s, y, weight, bias, mean, rstd, C, eps, BLOCK=block, HAS_H=has_h
    )
    return s, y, mean, rstd


def _ln_backward(s, dy2, ds2, weight, mean, rstd):
    """(dx, dweight, dbias): the LayerNorm's input gradient (plus the stream's ds2 when given)."""
    N, C = s.shape
    dx = torch.empty_like(s)
    programs = triton.cdiv(N, _ROWS)
    dw = torch.empty((programs, C), device=s.device, dtype=torch.float32)
    db = torch.empty((programs, C), device=s.device, dtype=torch.float32)
    has_ds = ds2 is not None
    _backward[(programs,)](
        s,
        dy2,
        ds2 if has_ds else dy2,
        dx,
        dw,
        db,
        weight,
        mean,
        rstd,
        N,
        C,
        ROWS=_ROWS,
        BLOCK=triton.next_power_of_2(C),
        HAS_DS=has_ds,
    )
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)


class _AddLayerNorm(torch.autograd.Function):
    """(x + h, LayerNorm(x + h))."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, eps):
        C = x.shape[-1]
        s, y, mean, rstd = _ln_forward(
            x.reshape(-1, C).contiguous(), h.reshape(-1, C).contiguous(), weight, bias, eps
        )
        ctx.save_for_backward(s, weight, mean, rstd)
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, mean, rstd = ctx.saved_tensors
        C = s.shape[-1]
        ds2 = ds.reshape(-1, C).contiguous() if ds is not None else None
        dx, dw, db = _ln_backward(s, dy.reshape(-1, C).contiguous(), ds2, weight, mean, rstd)
        dx = dx.view(dy.shape)
        return dx, dx, dw, db, None  # the sum's gradient flows to both terms unchanged


class _LayerNorm(torch.autograd.Function):
    """LayerNorm(x) by the same kernels (the first block's, which has no update to add)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        C = x.shape[-1]
        s, y, mean, rstd = _ln_forward(x.reshape(-1, C).contiguous(), None, weight, bias, eps)
        ctx.save_for_backward(s, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        s, weight, mean, rstd = ctx.saved_tensors
        C = s.shape[-1]
        dx, dw, db = _ln_backward(s, dy.reshape(-1, C).contiguous(), None, weight, mean, rstd)
        return dx.view(dy.shape), dw, db, None


def add_layernorm(
    x: torch.Tensor, h: torch.Tensor | None, ln: nn.LayerNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + h, LayerNorm(x + h)) in one kernel; with h None, (x, LayerNorm(x))."""
    if h is None:
        return x, _LayerNorm.apply(x, ln.weight, ln.bias, ln.eps)
    return _AddLayerNorm.apply(x, h, ln.weight, ln.bias, ln.eps)


def add_layernorm_reference(
    x: torch.Tensor, h: torch.Tensor | None, ln: nn.LayerNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in PyTorch: what the kernel is held to."""
    s = x if h is None else x + h
    return s, ln(s)
