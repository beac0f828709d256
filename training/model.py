"""GPT-2, as in the GPT-2 paper and build-nanogpt: learned positions, pre-norm blocks, tanh-GELU,
causal SDPA (flash) attention, final LayerNorm, and an lm_head that shares its tensor with wte.

The fast recipe's switches (GPTConfig; each off by default, and then the model is exactly the one above):
rotary positions instead of learned ones, RMS-normalised q and k, a ReLU^2 MLP, an untied head, output
projections that start at zero, soft-capped logits, value embeddings (token tables mixed into the first and last
layers' attention values) and U-net skips (each block of the first half feeds its mirror in the second).

Parameter names follow Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...), so importing
and exporting weights is a transpose of the Conv1D layers and nothing else (`training/hf.py`:
`gpt_from_hf`, `to_hf`, `export_hf_dir`).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
from torch.nn import functional as F

from training.chunked_loss import chunked_linear_cross_entropy
from training.config import GPTConfig

__all__ = ["GPT", "GPTConfig", "flops_per_token", "unwrap"]


class ResidualProjection(nn.Linear):
    """An output projection into the residual stream: initialised smaller (GPT._init_weights)."""


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer): each pair of a head's dimensions turned by an angle that grows
    with the position, so that q.k depends on the distance between tokens. The tables are buffers that are
    not saved (derived from the config)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)  # (T, head_dim / 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, n_head, T, head_dim)."""
        T = x.size(-2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(
            config.n_embd, 3 * config.n_embd
        )  # q, k, v for all heads in one matmul
        self.c_proj = ResidualProjection(config.n_embd, config.n_embd)
        head_dim = config.n_embd // config.n_head
        self.rotary = Rotary(head_dim, config.block_size) if config.pos_emb == "rope" else None
        self.qk_norm = config.qk_norm
        self.flash_attention4 = False  # train.attention=fa4 (GPT.use_flash_attention4)
        if config.value_table(layer) is not None:
            # v = a*v + b*(the token's value embedding); modded-nanogpt starts both at a half
            self.value_mix = nn.Parameter(torch.full((2,), 0.5))

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None = None) -> torch.Tensor:
        """ve: this layer's value embedding of the tokens (B, T, C), when it takes one."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        if ve is not None:  # the 0-dim gains keep v's dtype (bf16 under autocast)
            v = self.value_mix[0] * v + self.value_mix[1] * ve.to(v.dtype)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if (
            self.qk_norm
        ):  # bounded logits whatever the weights' scale: a larger stable learning rate
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        if self.flash_attention4:  # (B, T, n_head, head_dim) in and out: views, no copies
            from training.kernels.flash_attention4 import attention

            y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return self.c_proj(y.reshape(B, T, C))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True
        )  # flash attention where available
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class ReLU2(nn.Module):
    """ReLU squared (Primer): cheaper than GELU, and trains as well or better at this scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2's "gelu_new" by default (the attribute keeps its name: state dicts and hooks know it)
        self.gelu = ReLU2() if config.mlp_act == "relu2" else nn.GELU(approximate="tanh")
        self.c_proj = ResidualProjection(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), ve)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """The body: token and position embeddings, the blocks, the final LayerNorm (state-dict names as GPT-2's:
    transformer.wte, transformer.wpe, transformer.h.N, transformer.ln_f), and the switches' own parameters:
    value-embedding tables (transformer.vte.K) and U-net skip weights (transformer.skip_weights)."""

    def __init__(self, config: GPTConfig, vocab: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, config.n_embd)
        # rotary positions live in the attention; then there is no position table
        self.wpe = (
            nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        )
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.vte = nn.ModuleList(
            [nn.Embedding(vocab, config.n_embd) for _ in range(config.value_embeds)]
        )
        if config.unet_pairs:  # one weight per block of the second half that takes a skip
            self.skip_weights = nn.Parameter(torch.ones(config.unet_pairs))


class GPT(nn.Module):
    # each residual add and the LayerNorm after it in one kernel (train.fused_add_layernorm): the same math
    fused_add_layernorm = False
    # the loss's softmax, cross-entropy and gradient in one kernel (train.fused_classifier), on the chunked path
    fused_classifier = False

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        vocab = (
            config.padded_vocab_size
        )  # rows past config.vocab_size are padding: never input, never output
        self.transformer = Transformer(config, vocab)
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        if config.tie_embeddings:  # weight tying: one tensor, counted and optimised once
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if isinstance(module, ResidualProjection) and self.config.zero_init_proj:
                # each block starts as the identity: the residual stream is the embedding until trained
                torch.nn.init.zeros_(module.weight)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
                return
            if isinstance(module, ResidualProjection):
                # keeps the residual stream's variance from growing with depth (two adds per block)
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def use_flash_attention4(self, on: bool = True) -> None:
        """Every layer's attention by FlashAttention-4 instead of SDPA (train.attention=fa4)."""
        for block in self.transformer.h:
            cast(Block, block).attn.flash_attention4 = on

    def num_parameters(self, exclude_lookups: bool = False) -> int:
        """All parameters (the tied tensor once); `exclude_lookups`: only those that take part in matmuls, the
        N of the 6N FLOPs per token (tables that are only read from are not: positions, value embeddings, and
        the token embedding when the head does not share it)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied tensor once
        if exclude_lookups:
            t = self.transformer
            tables = [*([t.wpe] if t.wpe is not None else []), *t.vte]
            if not self.config.tie_embeddings:
                tables.append(t.wte)
            n -= sum(cast(nn.Embedding, e).weight.numel() for e in tables)
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_chunk: int = 0
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits over the real vocabulary (B, T, vocab_size) and the loss.

        With targets and `loss_chunk` > 0, the loss is computed `loss_chunk` tokens at a time
        (training/chunked_loss.py) and no logits are returned: the training step's memory lever. The fused
        classifier takes that path too (every token one chunk when `loss_chunk` is 0)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(torch.arange(0, T, dtype=torch.long, device=idx.device))
        ves = self._value_embeddings(idx)
        if self.fused_add_layernorm:
            x = self._fused_blocks(x, ves)
        else:
            x = self.transformer.ln_f(self._blocks(x, ves))
        if targets is not None and (loss_chunk or self.fused_classifier):
            return None, chunked_linear_cross_entropy(
                x.view(B * T, -1),
                self.lm_head.weight,
                targets.reshape(-1),
                self.config.vocab_size,
                loss_chunk or B * T,
                self.config.logit_softcap,
                fused=self.fused_classifier,
            )
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        if cap:  # before the padding's -inf, which tanh would turn into -cap
            logits = cap * torch.tanh(logits / cap)
        padded = self.config.padded_vocab_size != self.config.vocab_size
        loss: torch.Tensor | None = None
        if targets is not None:
            if padded:
                # Padding only makes the matmul shape friendly; the padded columns are not tokens. -inf gives
                # them no probability and no gradient, and the loss reads the contiguous logits as they are
                # (a slice would be copied whole first: 6.6 GB at B=64 in bf16).
                logits[..., self.config.vocab_size :] = float("-inf")
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        if padded:
            logits = logits[..., : self.config.vocab_size]  # callers see the real vocabulary only
        return logits, loss

    def _value_embeddings(self, idx: torch.Tensor) -> list[torch.Tensor | None]:
        """Each layer's value embedding of the tokens (model.value_embeds), None for a layer without one."""
        looked_up = [table(idx) for table in self.transformer.vte]
        tables = [self.config.value_table(i) for i in range(self.config.n_layer)]
        return [None if k is None else looked_up[k] for k in tables]

    def _blocks(self, x: torch.Tensor, ves: list[torch.Tensor | None]) -> torch.Tensor:
        """The residual stream through the blocks. With U-net skips, the output of each block of the first half
        is kept, and added (weighted) to the input of the block that mirrors it in the second half."""
        pairs, L = self.config.unet_pairs, self.config.n_layer
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.transformer.h):
            if i >= L - pairs:  # block L-1-j takes block j's output
                x = x + self.transformer.skip_weights[i - (L - pairs)] * skips.pop()
            x = block(x, ves[i])
            if i < pairs:
                skips.append(x)
        return x

    def _fused_blocks(self, x: torch.Tensor, ves: list[torch.Tensor | None]) -> torch.Tensor:
        """The blocks and ln_f with every residual add fused into the LayerNorm that reads its sum: each block's
        update is carried to the next LayerNorm (training/kernels/add_layernorm.py). With U-net skips, a block
        whose output is kept, or whose input takes a skip, has the add before it done apart, so the same sums
        are formed as in _blocks."""
        from training.kernels.add_layernorm import add_layernorm

        pairs, L = self.config.unet_pairs, self.config.n_layer
        skips: list[torch.Tensor] = []
        update: torch.Tensor | None = None
        for i, module in enumerate(self.transformer.h):
            block = cast(Block, module)
            if pairs and (0 < i <= pairs or i >= L - pairs):
                x, update = (x if update is None else x + update), None  # block i-1's output
                if i <= pairs:
                    skips.append(x)
                if i >= L - pairs:
                    update = self.transformer.skip_weights[i - (L - pairs)] * skips.pop()
            x, y = add_layernorm(x, update, block.ln_1)
            x, y = add_layernorm(x, block.attn(y, ves[i]), block.ln_2)
            update = block.mlp(y)
        return add_layernorm(x, update, self.transformer.ln_f)[1]


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (fwd + bwd) plus 12 * L * H * Q * T for attention
    (PaLM appendix B; Q = head dim, T = sequence length)."""
    head_dim = config.n_embd // config.n_head
    return 6 * n_params + 12 * config.n_layer * config.n_head * head_dim * seq_len


def unwrap(model: nn.Module) -> GPT:
    """The plain GPT under torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while not isinstance(model, GPT):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"{type(model).__name__} wraps no GPT")
        model = inner
    return model
