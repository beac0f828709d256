"""Per-GPU memory of a training run, from its config alone (arithmetic, no torch): what one rank holds at the
peak of a step, part by part, and the largest micro-batch that fits a GPU.

The model is training/model.py's GPT under training/step.py's step: fp32 weights, bf16 autocast (the matmuls'
inputs and outputs in bf16, LayerNorm and the loss in fp32), fused AdamW, torch.compile, SDPA flash attention
(no T x T matrix), DDP over several ranks, no activation checkpointing.

- weights, gradients: fp32, 4 bytes per parameter each; AdamW's m and v: 8.
- DDP's gradient buckets: another fp32 copy of the gradients (4) on more than one rank.
- bf16 copies of the weights: autocast casts each matmul's weight once per forward and autograd keeps the
  copy for the backward pass (2 bytes per parameter).
- activations: per layer and token, what a block keeps for its backward pass (`ACTIVATION_TERMS`; 38 bytes
  per channel in bf16: the fp32 residual stream at both LayerNorm inputs, the LayerNorm outputs, q, k, v,
  the attention output and its (B, T, C) copy, the MLP's 4C hidden before and after GELU), plus the final
  LayerNorm's input and output. `train.attention = "math"` adds the score and probability matrices.
- logits: (tokens x padded vocab). Compiled, the bf16 logits and one fp32 tensor for the loss (6 bytes each);
  eager, or without autocast, three fp32 tensors at the start of the backward pass (log-softmax output, its
  gradient, the logits' gradient: 12 bytes). With `train.loss_chunk` only one chunk's exists at a time; with
  `train.fused_classifier` only the logits in the matmul dtype, which their gradient overwrites.
- a fixed 2.5 GB for what PyTorch's allocator does not count: the CUDA context, cuBLAS/cuDNN workspaces, NCCL's
  buffers, the allocator's slack.

Checked against the H200 measurements in bench/results/ (GPT-2 124M, T=1024, one GPU, no DDP: the estimate
without DDP buckets and without the fixed overhead, against `torch.cuda.max_memory_allocated`; tests/unit/test_memory.py
reads the same files):

    row (B=64 unless named)                measured          estimate
    build-nanogpt recipe (compiled)        43.8 GB           45.3 GB           +3.5%
    + chunked loss (8192 tokens)           27.6 GB           28.1 GB           +1.5%
    + chunked loss, B=96 / B=128           40.6 / 55.2 GB    39.7 / 51.4 GB    -2.2% / -6.9%
    torch.compile off (eager)              63.5 GB           65.1 GB           +2.5%
    bf16 autocast off (fp32)               81.2 GB           83.0 GB           +2.2%
    SDPA math attention (-math.json)       82.4 GB           83.9 GB           +1.9%

(The ablation file's own "SDPA math" row ran cuDNN's kernel from a cached graph: bench/results/README.md.)

The gradients count in full although the benchmark's single micro-step frees them before the forward pass
(zero_grad(set_to_none=True)): with gradient accumulation they live through every later micro-step. Not
modelled: an unpadded vocabulary (`model.pad_vocab_to = 1`; the compiled step then measured 13 GB more at
B=64), and memory fragmentation beyond the fixed overhead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.config import GPTConfig, RunConfig

__all__ = [
    "ACTIVATION_TERMS",
    "FIXED_OVERHEAD_BYTES",
    "GB",
    "MemoryEstimate",
    "estimate",
    "fitting_micro_batch",
    "gb",
    "num_parameters",
]

GB = 1e9  # memory is reported in GB (10^9 bytes), as bench/results/ and GPU datasheets give it

FIXED_OVERHEAD_BYTES = int(2.5 * GB)

# What one block keeps for its backward pass, per token: (tensor, channels as multiples of n_embd, width).
# Width "act" is the autocast dtype's (bf16: 2 bytes); "residual" is the residual stream's, fp32 (4) because
# the embeddings are fp32 and a bf16 branch added to an fp32 stream stays fp32.
ACTIVATION_TERMS: tuple[tuple[str, int, str], ...] = (
    ("ln_1 input (residual stream)", 1, "residual"),
    ("ln_1 output, c_attn's input", 1, "act"),
    ("q, k, v (SDPA's inputs)", 3, "act"),
    ("SDPA output", 1, "act"),
    ("its (B, T, C) copy, attn.c_proj's input", 1, "act"),
    ("ln_2 input (residual stream)", 1, "residual"),
    ("ln_2 output, c_fc's input", 1, "act"),
    ("c_fc output, GELU's input", 4, "act"),
    ("GELU output, mlp.c_proj's input", 4, "act"),
)


def num_parameters(model: GPTConfig) -> int:
    """Parameters of training/model.py's GPT, counting a tied wte/lm_head tensor once, padded rows included."""
    c = model.n_embd
    per_layer = (
        12 * c * c + 13 * c
    )  # c_attn 3C^2+3C, attn.c_proj C^2+C, c_fc 4C^2+4C, mlp.c_proj 4C^2+C, 2 LN 4C
    heads = 1 if model.tie_embeddings else 2
    tables = (heads + model.value_embeds) * model.padded_vocab_size * c
    positions = model.block_size * c if model.pos_emb == "learned" else 0
    gains = (
        2 * 2 * model.value_embeds + model.unet_pairs
    )  # each value-embedding layer's a, b; skip weights
    return tables + positions + model.n_layer * per_layer + 2 * c + gains


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at the peak of a training step, by part."""

    weights: int
    grads: int
    optimizer: int
    ddp_buckets: int
    weight_copies: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.grads
            + self.optimizer
            + self.ddp_buckets
            + self.weight_copies
            + self.activations
            + self.logits
            + self.overhead
        )

    @property
    def states(self) -> int:
        """Weights, gradients and AdamW's moments."""
        return self.weights + self.grads + self.optimizer

    def summary(self) -> str:
        """The parts in GB, e.g. 'weights+grads+AdamW 25 GB, DDP buckets+bf16 weights 9.3 GB, ...'."""
        parts = [
            ("weights+grads+AdamW", self.states),
            ("DDP buckets+bf16 weights", self.ddp_buckets + self.weight_copies),
            ("activations", self.activations),
            ("logits", self.logits),
            ("CUDA/NCCL", self.overhead),
        ]
        return ", ".join(f"{name} {gb(n)} GB" for name, n in parts if n)


def gb(n: float) -> str:
    """Bytes as GB for a message: whole numbers from 10 GB on, one decimal below."""
    v = n / GB
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def estimate(
    cfg: RunConfig,
    *,
    world_size: int = 1,
    micro_batch: int | None = None,
    overhead: int = FIXED_OVERHEAD_BYTES,
) -> MemoryEstimate:
    """Per-GPU bytes of `cfg` on CUDA at `micro_batch` (default: the config's) and its sequence length.
    `world_size` > 1 adds DDP's buckets; `overhead=0` leaves out what the allocator does not count."""
    m, t = cfg.model, cfg.train
    n = num_parameters(m)
    bf16 = t.dtype != "float32"  # "auto" is bf16 autocast on CUDA
    act, residual = (2, 4) if bf16 else (4, 4)
    width = {"act": act, "residual": residual}
    tokens = (micro_batch or t.micro_batch) * t.seq_len
    c = m.n_embd
    per_layer = sum(k * width[w] for _, k, w in ACTIVATION_TERMS) * c
    if t.attention == "math":  # scores and softmax probabilities, T x T per head, both saved
        per_layer += 2 * m.n_head * t.seq_len * act
    # after the blocks: ln_f's input, and its output as the lm_head's input (with the chunked loss instead the
    # fp32 gradient for it, computed in the forward pass)
    chunked = (
        t.loss_chunk or t.fused_classifier
    )  # the fused classifier takes the chunked loss's path
    head = (residual + (residual if chunked else act)) * c
    # value embeddings: each table's lookup (fp32), and per layer that mixes one in, its copy in the matmul dtype
    # and the values before the mix
    values = (m.value_embeds * residual + 2 * m.value_embeds * 2 * act) * c
    activations = tokens * (m.n_layer * per_layer + head + values)
    if t.fused_classifier:
        per_logit = act  # the logits, overwritten by their gradient in place
    elif t.loss_chunk:
        per_logit = act + 4  # one chunk's product in the matmul dtype, and in fp32 for the softmax
    elif bf16 and t.compile:
        per_logit = act + 4  # the bf16 logits and one fp32 tensor of the fused loss
    else:
        per_logit = 12  # three fp32 tensors as the backward pass starts (measured: eager bf16, compiled fp32)
    logits = min(tokens, t.loss_chunk or tokens) * m.padded_vocab_size * per_logit
    return MemoryEstimate(
        weights=4 * n,
        grads=4 * n,
        optimizer=8 * n,
        ddp_buckets=4 * n if world_size > 1 else 0,
        weight_copies=2 * n if bf16 else 0,
        activations=activations,
        logits=logits,
        overhead=overhead,
    )


def fitting_micro_batch(
    cfg: RunConfig, gpu_bytes: float, *, world_size: int = 1, overhead: int = FIXED_OVERHEAD_BYTES
) -> int | None:
    """The largest power-of-two micro-batch whose estimate fits `gpu_bytes` and that splits the config's global
    batch and validation tokens over `world_size` ranks; None when not even 1 does."""
    t = cfg.train
    best, b = None, 1
    while b * t.seq_len * world_size <= t.total_batch_tokens:
        per_step = b * t.seq_len * world_size
        if (
            t.total_batch_tokens % per_step == 0
            and cfg.eval.val_tokens % per_step == 0
            and estimate(cfg, world_size=world_size, micro_batch=b, overhead=overhead).total
            <= gpu_bytes
        ):
            best = b
        b *= 2
    return best
