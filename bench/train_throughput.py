"""Training throughput and MFU of the real training step (training/step.py) on synthetic tokens.

    python bench/train_throughput.py                          # gpt2-124m, micro-batches 16/32/64, on CUDA
    python bench/train_throughput.py --ablation               # + each build-nanogpt optimisation switched off
    python bench/train_throughput.py --config tiny --device cpu --micro-batches 2 --seq-len 64 --steps 2  # smoke

Prints tokens/s, ms/step and MFU (6N + 12*L*H*Q*T FLOPs per token against the GPU's bf16 peak) for each
variant next to the baseline, build-nanogpt's configuration (B=64, T=1024, bf16, TF32, compile, flash,
vocab 50304, fused AdamW) run by the same code, and writes the figures with the machine they ran on to
bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import load_config  # noqa: E402
from training.metrics import peak_flops  # noqa: E402
from training.model import GPT, flops_per_token  # noqa: E402
from training.optim import configure_optimizer  # noqa: E402
from training.step import train_step  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    micro_batch: int
    bf16: bool = True
    tf32: bool = True
    compile: bool = True
    flash: bool = True
    pad_vocab: bool = True
    fused_adamw: bool = True


def ablations(base: Variant) -> list[Variant]:
    """Each optimisation of the recipe off on its own, then all off (the lecture's fp32 starting point)."""
    r = dataclasses.replace
    return [
        r(base, name="- TF32", tf32=False),
        r(base, name="- bf16 autocast", bf16=False),
        r(base, name="- torch.compile", compile=False),
        r(base, name="- flash attention (SDPA math)", flash=False),
        r(base, name="- vocab 50304 (50257)", pad_vocab=False),
        r(base, name="- fused AdamW", fused_adamw=False),
        Variant("plain fp32 (all off)", base.micro_batch, False, False, False, False, False, False),
    ]


def measure(cfg, v: Variant, device: torch.device, seq_len: int, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    model_cfg = cfg.model.model_copy(update={"pad_vocab_to": 64 if v.pad_vocab else 1})
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = v.tf32
        torch.backends.cudnn.allow_tf32 = v.tf32
    model = GPT(model_cfg).to(device)
    n_params = model.num_parameters(exclude_positions=True)
    opt = configure_optimizer(model, lr=6e-4, weight_decay=0.1, device_type=device.type,
                              fused=v.fused_adamw and device.type == "cuda")
    run = torch.compile(model) if v.compile else model
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (v.micro_batch, seq_len + 1), generator=gen).to(torch.uint16)
    if device.type == "cuda":
        tokens = tokens.pin_memory()
    batch = lambda: (tokens[:, :-1], tokens[:, 1:])  # noqa: E731
    amp = torch.bfloat16 if v.bf16 else None
    attn = nullcontext()
    if not v.flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attn = sdpa_kernel([SDPBackend.MATH])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with attn:
        for i in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            loss, _ = train_step(run, opt, batch, grad_accum=1, device=device, lr=6e-4, grad_clip=1.0,
                                 autocast_dtype=amp)
            loss.item()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    tok_s = v.micro_batch * seq_len / dt
    peak = peak_flops(device)
    mfu = flops_per_token(model_cfg, n_params, seq_len) * tok_s / peak if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    del model, run, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {**dataclasses.asdict(v), "ms_per_step": 1000 * dt, "tokens_per_s": tok_s, "mfu": mfu, "mem_gb": mem,
            "final_loss": loss.item()}


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "host_cpu": platform.processor()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), peak_bf16_flops=peak_flops(device))
    else:
        info.update(gpu=None, threads=torch.get_num_threads())
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="gpt2-124m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--micro-batches", default="16,32,64")
    ap.add_argument("--baseline-micro-batch", type=int, default=64, help="build-nanogpt's B")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="for machines without a working compiler toolchain")
    ap.add_argument("--out", default=None, help="results JSON (default: bench/results/train_throughput-<when>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cfg = load_config(args.config)
    compile_ok = not args.no_compile
    baseline = Variant("baseline: build-nanogpt recipe", args.baseline_micro_batch, compile=compile_ok)
    variants = [baseline] + [Variant(f"ours B={b}", int(b), compile=compile_ok) for b in args.micro_batches.split(",")]
    if args.ablation:
        variants += ablations(baseline)
    rows = []
    for v in variants:
        try:
            rows.append(measure(cfg, v, device, args.seq_len, args.warmup, args.steps))
        except torch.OutOfMemoryError:
            rows.append({**dataclasses.asdict(v), "error": "out of memory"})
            torch.cuda.empty_cache()
    base = rows[0].get("tokens_per_s")
    print(f"{'variant':38} {'B':>4} {'ms/step':>9} {'tok/s':>12} {'MFU':>7} {'vs baseline':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:38} {r['micro_batch']:>4} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['name']:38} {r['micro_batch']:>4} {r['ms_per_step']:>9.1f} {r['tokens_per_s']:>12,.0f} {mfu:>7} "
              f"{r['tokens_per_s'] / base:>11.2f}x")
    when = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or Path(__file__).parent / "results" / f"train_throughput-{when}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": when, "machine": machine(device), "config": args.config,
                               "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps,
                               "rows": rows}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
