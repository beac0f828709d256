"""Training throughput and MFU of the real training step (training/step.py) on synthetic tokens.

    python bench/train_throughput.py                          # gpt2-124m, micro-batches 16/32/64, on CUDA
    python bench/train_throughput.py --ablation               # + each build-nanogpt optimisation switched off
    python bench/train_throughput.py --levers                 # + what goes beyond the recipe (see levers())
    python bench/train_throughput.py --levers --combine --profile   # + the levers that gained, together
    python bench/train_throughput.py --recipe-switches gpt2-124m-fast   # + what each fast-recipe switch costs
    python bench/train_throughput.py --only chunked,cuDNN     # the baseline + the variants whose names match
    python bench/train_throughput.py --render bench/results/train_throughput-X.json   # the markdown table
    python bench/train_throughput.py --config tiny --device cpu --micro-batches 2 --seq-len 64 --steps 2  # smoke

Prints tokens/s, ms/step, MFU (6N + 12*L*H*Q*T FLOPs per token against the GPU's bf16 peak), peak memory and
compile time for each variant next to the baseline, build-nanogpt's configuration (B=64, T=1024, bf16, TF32,
compile, SDPA, vocab 50304, fused AdamW) run by the same code. The figures and the machine they ran on go to
bench/results/ after every variant, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import accel
from training.config import ConfigError, apply_overrides, build_config, load_config
from training.metrics import peak_flops
from training.model import GPT, flops_per_token
from training.optim import build_optimizer, configure_optimizer
from training.step import StepSetup, train_step


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    micro_batch: int
    bf16: bool = True
    tf32: bool = True
    compile: bool = True
    attention: str = (
        "auto"  # SDPA picks (cuDNN's flash kernel, torch 2.11 on H100/H200); else that one alone
    )
    pad_vocab: bool = True
    fused_adamw: bool = True
    loss_chunk: int = 0
    compile_mode: str = "default"
    coordinate_descent: bool = (
        False  # inductor's coordinate-descent tuning of each generated kernel's launch config
    )
    fused_add_ln: bool = (
        False  # training/kernels/add_layernorm.py: each residual add + LayerNorm in one
    )
    fused_classifier: bool = (
        False  # training/kernels/classifier.py: the loss's softmax and gradient in one
    )
    # config overrides of the model and the optimizer (the fast recipe's switches: recipe_switches)
    overrides: tuple[str, ...] = ()


def ablations(base: Variant) -> list[Variant]:
    """Each optimisation of the recipe off on its own, then all off (the lecture's fp32 starting point)."""
    r = dataclasses.replace
    return [
        r(base, name="- TF32", tf32=False),
        r(base, name="- bf16 autocast", bf16=False),
        r(base, name="- torch.compile", compile=False),
        r(base, name="- fast attention (SDPA math)", attention="math"),
        r(base, name="- vocab 50304 (50257)", pad_vocab=False),
        r(base, name="- fused AdamW", fused_adamw=False),
        Variant(
            "plain fp32 (all off)",
            base.micro_batch,
            bf16=False,
            tf32=False,
            compile=False,
            attention="math",
            pad_vocab=False,
            fused_adamw=False,
        ),
    ]


def levers(base: Variant) -> list[Variant]:
    """Beyond build-nanogpt's recipe, one at a time on top of it."""
    r = dataclasses.replace
    return [
        r(base, name="+ chunked lm_head+CE (8192 tok)", loss_chunk=8192),
        r(base, name="+ chunked CE, B=96", micro_batch=96, loss_chunk=8192),
        r(base, name="+ chunked CE, B=128", micro_batch=128, loss_chunk=8192),
        r(base, name="+ flash attention forced", attention="flash"),
        r(base, name="+ cuDNN attention", attention="cudnn"),
        r(base, name="+ FlashAttention-4 (flash-attn-4)", attention="fa4"),
        # before max-autotune: its autotuning takes minutes, and a fault in it ends the process
        r(base, name="+ CUDA graphs (reduce-overhead)", compile_mode="reduce-overhead"),
        # what autotuning can still gain: cuBLAS beat Triton's matmul templates at every product of this step
        # (bench/results/), so only the memory-bound fused kernels (30% of the step) are left to tune
        r(base, name="+ coordinate-descent tuning of the fused kernels", coordinate_descent=True),
        r(base, name="+ residual add + LayerNorm kernel (ours)", fused_add_ln=True),
        r(base, name="+ fused classifier (ours)", fused_classifier=True),
        r(
            base,
            name="+ fused classifier, chunked (8192 tok)",
            fused_classifier=True,
            loss_chunk=8192,
        ),
        # with the chunked loss: unchunked, the lm_head's weight gradient (50304 x B*T) is a product that
        # Triton's matmul templates index past 2**31 elements in autotuning (an illegal memory access on
        # torch 2.11 + Triton 3.6 that ends the process's CUDA context)
        r(
            base,
            name="+ compile max-autotune-no-cudagraphs, chunked CE",
            compile_mode="max-autotune-no-cudagraphs",
            loss_chunk=8192,
        ),
    ]


def recipe_switches(base: Variant, faithful: str, fast: str) -> list[Variant]:
    """The fast preset's switches that change the step's work (its model.* fields and the optimizer; not the
    schedule or learning rates), each on its own on top of the baseline, then all of them: what each costs per
    step, read from the two presets so that the rows follow the preset."""
    a, b = load_config(faithful).model_dump(), load_config(fast).model_dump()
    shape = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "pad_vocab_to")
    other = [k for k in shape if a["model"][k] != b["model"][k]]
    if other:
        raise ValueError(
            f"{fast} is not {faithful} with switches: its model.{other[0]} is {b['model'][other[0]]}, "
            f"not {a['model'][other[0]]}"
        )
    switches = [
        f"model.{k}={v if isinstance(v, str) else json.dumps(v)}"
        for k, v in b["model"].items()
        if v != a["model"][k]
    ]
    if b["optim"]["optimizer"] != a["optim"]["optimizer"]:
        switches.append(f"optim.optimizer={b['optim']['optimizer']}")
    rows = [
        dataclasses.replace(base, name=f"+ {s.replace('=', ' = ')}", overrides=(s,))
        for s in switches
    ]
    everything = f"optim.muon_lr={b['optim']['muon_lr']}"  # Muon's own rate, for a real update
    return [
        dataclasses.replace(r, overrides=(*r.overrides, everything)) if "muon" in r.name else r
        for r in rows
    ] + [
        dataclasses.replace(
            base, name=f"+ all of {fast}'s switches", overrides=(*switches, everything)
        )
    ]


def best_combination(base: Variant, rows: list[dict], min_gain: float = 0.01) -> Variant | None:
    """The levers ("+ ..." rows) that beat the baseline (the first row) by more than `min_gain`, together: the
    best first, and each later one only where it sets no field that a better one set otherwise (two attention
    kernels, two compile modes, two micro-batches: the faster stays). None when fewer than two levers gained."""
    fields = [f.name for f in dataclasses.fields(Variant) if f.name != "name"]
    base_tok_s = rows[0].get("tokens_per_s")
    if not base_tok_s:
        return None
    levers_ = (
        r for r in rows[1:] if r["name"].startswith("+ ")
    )  # not the ablations, not other B's
    gained = sorted(
        (r for r in levers_ if r.get("tokens_per_s", 0) > base_tok_s * (1 + min_gain)),
        key=lambda r: -r["tokens_per_s"],
    )
    chosen: dict[str, object] = {}
    names = []
    for r in gained:
        changes = {f: r[f] for f in fields if f in r and r[f] != getattr(base, f)}
        if not changes or any(chosen.get(f, v) != v for f, v in changes.items()):
            continue
        if changes.items() <= chosen.items():
            continue  # nothing new (a lever already inside a better one)
        chosen.update(changes)
        names.append(r["name"].removeprefix("+ "))
    if len(names) < 2:
        return None
    return dataclasses.replace(base, name="best combination: " + " + ".join(names), **chosen)


# Kernel families by name, for the profile's breakdown of where a step's GPU time goes.
KERNEL_FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "xmma", "cublas")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("fused elementwise/reductions (Triton)", ("triton",)),
)


def profile_step(step, out: Path | None, steps: int = 3) -> dict:
    """GPU time per kernel family over a few steps, against the steps' wall time: what the step is made of,
    and how much of it the GPU sits idle (launch gaps, host work, synchronisation)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    families: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if not t or ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.key.lower()
        fam = next((f for f, keys in KERNEL_FAMILIES if any(k in name for k in keys)), "other")
        families[fam] = families.get(fam, 0.0) + t / 1000 / steps  # us -> ms per step
    busy = sum(families.values())
    sort_key = (
        "self_device_time_total"
        if hasattr(prof.key_averages()[0], "self_device_time_total")
        else "self_cuda_time_total"
    )
    if out is not None:
        out.write_text(
            prof.key_averages().table(sort_by=sort_key, row_limit=40, max_name_column_width=90)
        )
    return {
        "wall_ms": 1000 * wall,
        "gpu_busy_ms": busy,
        "families_ms": dict(sorted(families.items(), key=lambda kv: -kv[1])),
    }


def _step_setup(cfg, v: Variant, device: torch.device, seq_len: int) -> tuple[StepSetup, int]:
    """The variant's model, optimizer and one fixed micro-batch, as the training step takes them, and the
    model's parameter count (positions left out, as in the MFU)."""
    torch.manual_seed(0)
    if v.overrides:
        cfg = build_config(apply_overrides(cfg.model_dump(), list(v.overrides)), v.name)
    model_cfg = cfg.model.model_copy(update={"pad_vocab_to": 64 if v.pad_vocab else 1})
    accel.configure(device, tf32=v.tf32, attention=v.attention if device.type == "cuda" else "auto")
    model = GPT(model_cfg).to(device)
    model.fused_add_layernorm = v.fused_add_ln
    model.fused_classifier = v.fused_classifier
    model.use_flash_attention4(v.attention == "fa4")
    opt = (
        build_optimizer(model, cfg.optim, device.type)
        if cfg.optim.optimizer == "muon"
        else configure_optimizer(
            model,
            lr=6e-4,
            weight_decay=0.1,
            device_type=device.type,
            fused=v.fused_adamw and device.type == "cuda",
        )
    )
    mode = None if v.compile_mode == "default" else v.compile_mode
    # A fresh compilation per variant: dynamo's caches would otherwise turn a second batch size into a
    # dynamic-shape graph, and after 8 recompilations fall back to eager without a word.
    torch._dynamo.reset()
    run = torch.compile(model, mode=mode, dynamic=False) if v.compile else model
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (v.micro_batch, seq_len + 1), generator=gen).to(
        torch.uint16
    )
    if device.type == "cuda":
        tokens = tokens.pin_memory()
    setup = StepSetup(
        run,
        opt,
        lambda: (tokens[:, :-1], tokens[:, 1:]),
        grad_accum=1,
        device=device,
        grad_clip=1.0,
        autocast_dtype=torch.bfloat16 if v.bf16 else None,
        loss_chunk=v.loss_chunk,
    )
    return setup, model.num_parameters(exclude_lookups=True)


def measure(
    cfg,
    v: Variant,
    device: torch.device,
    seq_len: int,
    warmup: int,
    steps: int,
    profile: bool | None = None,
    profile_to: Path | None = None,
) -> dict:
    setup, n_params = _step_setup(cfg, v, device, seq_len)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one_step() -> float:
        return train_step(setup, lr=6e-4).loss.item()

    times, last_loss = [], float("nan")
    for _ in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        last_loss = one_step()
        sync()
        times.append(time.perf_counter() - t0)
    prof = profile_step(one_step, profile_to) if profile and device.type == "cuda" else None
    first_step = times[0]  # compilation and autotuning happen here
    times = times[warmup:]
    dt = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    tok_s = v.micro_batch * seq_len / dt
    peak = peak_flops(device)
    model_cfg = cfg.model.model_copy(update={"pad_vocab_to": 64 if v.pad_vocab else 1})
    mfu = flops_per_token(model_cfg, n_params, seq_len) * tok_s / peak if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    setup = None  # the variant's memory freed before the next one is measured
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    accel.configure(device, tf32=True)  # back to the defaults for the next variant
    return {
        **dataclasses.asdict(v),
        "ms_per_step": 1000 * dt,
        "tokens_per_s": tok_s,
        "mfu": mfu,
        "mem_gb": mem,
        "first_step_s": first_step,
        "final_loss": last_loss,
        **({"profile": prof} if prof else {}),
    }


def machine(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpu": platform.processor(),
    }
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            peak_bf16_flops=peak_flops(device),
        )
    else:
        info.update(gpu=None, threads=torch.get_num_threads())
    return info


# Published figures of the anchors, on their machines (not re-measured here; the baseline row is the one
# measured side by side): context for a reader, never the comparison itself.
ANCHORS = (
    "Published anchors: build-nanogpt ~90 ms/step at B=16, T=1024 on one A100 (~176k tok/s, ~48% MFU); "
    "llm.c GPT-2 124M on 8xH100 ~468k tok/s per GPU (~38% MFU). Target: >= 60% MFU "
    "(~690k tok/s on one H100) and >= 1.3x the baseline row."
)


def table(res: dict, markdown: bool = False) -> str:
    """The rows next to the baseline (the first row), as text or as a markdown table for the README."""
    rows, m = res["rows"], res["machine"]
    base = rows[0].get("tokens_per_s")
    head = ["variant", "B", "ms/step", "tok/s", "MFU", "vs baseline", "mem GB", "1st step s"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["name"], str(r["micro_batch"]), r["error"], "", "", "", "", ""])
            continue
        body.append(
            [
                r["name"],
                str(r["micro_batch"]),
                f"{r['ms_per_step']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
                f"{r['tokens_per_s'] / base:.2f}x" if base else "n/a",
                f"{r['mem_gb']:.1f}" if r.get("mem_gb") is not None else "n/a",
                f"{r['first_step_s']:.1f}" if "first_step_s" in r else "n/a",
            ]
        )
    where = (
        f"{m.get('gpu') or 'CPU'}, torch {m['torch']}"
        + (f", CUDA {m['cuda']}" if m.get("cuda") else "")
        + f"; {res['config']}, T={res['seq_len']}, median of {res['steps']} steps after {res['warmup']}"
        + f" warm-up; {res['when']}"
    )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
        return "\n".join(lines + ["", f"Measured on {where}.", "", ANCHORS, "", *profiles(rows)])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def fmt(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )

    return "\n".join([where, fmt(head), *map(fmt, body), ANCHORS, *profiles(rows)])


def profiles(rows: list[dict]) -> list[str]:
    """One line per profiled row: where the step's GPU time goes and how long the GPU sits idle."""
    out = []
    for r in rows:
        p = r.get("profile")
        if p:
            idle = max(0.0, p["wall_ms"] - p["gpu_busy_ms"])
            fams = ", ".join(f"{k} {v:.1f}" for k, v in p["families_ms"].items())
            out.append(
                f"profile {r['name']}: {p['wall_ms']:.1f} ms/step, GPU busy {p['gpu_busy_ms']:.1f} ms "
                f"(idle {idle:.1f} ms); {fams} (ms/step)"
            )
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="gpt2-124m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--micro-batches", default="16,32,64")
    ap.add_argument("--baseline-micro-batch", type=int, default=64, help="build-nanogpt's B")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--ablation", action="store_true", help="each optimisation of the recipe off on its own"
    )
    ap.add_argument("--levers", action="store_true", help="each lever beyond the recipe on its own")
    ap.add_argument(
        "--recipe-switches",
        metavar="FAST_PRESET",
        help="each switch of this preset (e.g. gpt2-124m-fast) that --config lacks, on its own, then all of "
        "them: the per-step cost of the fast recipe",
    )
    ap.add_argument(
        "--combine",
        action="store_true",
        help="then the levers that gained, together in one row (best_combination), profiled with --profile",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated parts of variant names; the baseline always runs",
    )
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="for machines without a working compiler toolchain",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="results JSON (default: bench/results/train_throughput-<when>.json)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="profile each variant (GPU time per kernel family, GPU idle time); the baseline's kernels "
        "to a file",
    )
    ap.add_argument(
        "--render", metavar="JSON", help="print a results file as a markdown table and exit"
    )
    return ap


def _variants(args: argparse.Namespace) -> list[Variant]:
    """The baseline first, then the micro-batches, the ablations and the levers asked for."""
    compile_ok = not args.no_compile
    baseline = Variant(
        "baseline: build-nanogpt recipe", args.baseline_micro_batch, compile=compile_ok
    )
    variants = [
        Variant(f"ours B={b}", int(b), compile=compile_ok)
        for b in args.micro_batches.split(",")
        if b
    ]
    if args.ablation:
        variants += ablations(baseline)
    if args.levers:
        variants += levers(baseline)
    if args.recipe_switches:
        variants += recipe_switches(baseline, args.config, args.recipe_switches)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        variants = [v for v in variants if any(w in v.name for w in wanted)]
    return [baseline] + [dataclasses.replace(v, compile=v.compile and compile_ok) for v in variants]


def _measure_safely(cfg, v: Variant, device: torch.device, args, profile_to) -> tuple[dict, bool]:
    """The variant's row (its error, when this torch or GPU cannot run it), and whether the CUDA context
    survived it."""
    try:
        with inductor_config.patch(
            coordinate_descent_tuning=v.coordinate_descent
        ):  # restored after
            row = measure(
                cfg, v, device, args.seq_len, args.warmup, args.steps, args.profile, profile_to
            )
    except torch.OutOfMemoryError:
        row = {**dataclasses.asdict(v), "error": "out of memory"}
    except (
        Exception
    ) as err:  # a lever this torch/GPU cannot run (e.g. no cuDNN attention): say so, go on
        row = {
            **dataclasses.asdict(v),
            "error": f"{type(err).__name__}: {str(err).splitlines()[0][:80]}",
        }
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except (
            Exception
        ) as err:  # a kernel fault (illegal address) poisons the context: nothing after runs
            row = {
                **dataclasses.asdict(v),
                "error": f"CUDA context lost: {str(err).splitlines()[0][:80]}",
            }
            return row, False
    return row, True


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.render:
        print(table(json.loads(Path(args.render).read_text()), markdown=True))
        return 0
    try:
        variants = _variants(args)
    except (
        ValueError,
        ConfigError,
    ) as err:  # a preset that is not there, or not this one with switches
        ap.error(str(err))
    device = torch.device(args.device)
    cfg = load_config(args.config)
    when = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or Path(__file__).parent / "results" / f"train_throughput-{when}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {
        "when": when,
        "machine": machine(device),
        "config": args.config,
        "seq_len": args.seq_len,
        "warmup": args.warmup,
        "steps": args.steps,
        "rows": [],
    }
    baseline = variants[0]
    while variants:
        v = variants.pop(0)
        profile_to = out.with_suffix(".profile.txt") if args.profile and not res["rows"] else None
        if v.name.startswith("best combination"):
            profile_to = out.with_suffix(".best.profile.txt") if args.profile else None
        row, context_ok = _measure_safely(cfg, v, device, args, profile_to)
        res["rows"].append(row)
        said = row["error"] if "error" in row else f"{row['ms_per_step']:.1f} ms/step"
        print(f"  {v.name}: {said}", file=sys.stderr, flush=True)
        out.write_text(json.dumps(res, indent=2))  # after every variant: a run cut short keeps it
        if not context_ok:
            print(
                "the CUDA context is lost: the variants after this one need a new process (--only)",
                file=sys.stderr,
            )
            break
        if args.combine and not variants and not v.name.startswith("best combination"):
            best = best_combination(baseline, res["rows"])
            if best is not None:
                variants.append(best)
    print(table(res))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
