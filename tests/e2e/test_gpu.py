"""CUDA paths of the training step: bf16 autocast, torch.compile, the SDPA kernels, fused AdamW and the
chunked loss give what the plain fp32 path gives. Needs a GPU: skipped on CPU machines (CI has none); on a GPU
node, `bash bench/gpu_node.sh check` runs them. The CPU halves of these checks are in tests/unit/test_model.py and
tests/e2e/test_bench.py."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO

from training import accel
from training.config import GPTConfig
from training.loader import ShardLoader
from training.model import GPT
from training.optim import configure_optimizer
from training.step import StepSetup, train_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"
    ),
]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _default_kernels():
    yield
    accel.configure(CUDA, tf32=True)


def _losses(
    demo_data, *, fast: bool, steps=50, loss_chunk=0, fused_add_ln=False, fused_classifier=False
):
    """50 optimizer steps of a GPT-2-shaped model (12 x 768, T=256) on real tokens, fast or plain fp32."""
    cfg = GPTConfig(block_size=256)
    accel.configure(CUDA, tf32=fast, attention="auto" if fast else "math")
    torch.manual_seed(0)
    model = GPT(cfg).to(CUDA)
    model.fused_add_layernorm = fused_add_ln
    model.fused_classifier = fused_classifier
    opt = configure_optimizer(model, lr=6e-4, weight_decay=0.1, device_type="cuda", fused=fast)
    run = torch.compile(model) if fast else model
    loader = ShardLoader(demo_data, "train", 8, 256)
    setup = StepSetup(
        run,
        opt,
        loader.next_batch,
        grad_accum=2,
        device=CUDA,
        grad_clip=1.0,
        autocast_dtype=torch.bfloat16 if fast else None,
        loss_chunk=loss_chunk,
    )
    return [train_step(setup, lr=6e-4).loss.item() for _ in range(steps)]


def test_optimized_step_matches_plain_fp32_after_50_steps(demo_data):
    plain = _losses(demo_data, fast=False)
    fast = _losses(demo_data, fast=True)
    chunked = _losses(demo_data, fast=True, loss_chunk=1024)
    assert plain[-1] < plain[0] - 2  # it learned, so agreeing means something
    tail = lambda xs: sum(xs[-5:]) / 5  # noqa: E731
    assert tail(fast) == pytest.approx(tail(plain), rel=0.02)
    assert tail(chunked) == pytest.approx(tail(plain), rel=0.02)


def test_the_residual_add_layernorm_kernel_learns_what_the_plain_step_learns(demo_data):
    """training/kernels/add_layernorm.py compiled for the GPU, in the bf16 compiled step: the plain fp32
    step's trace (its interpreter twin: tests/unit/test_kernels.py)."""
    plain = _losses(demo_data, fast=False)
    fused = _losses(demo_data, fast=True, fused_add_ln=True)
    tail = lambda xs: sum(xs[-5:]) / 5  # noqa: E731
    assert tail(fused) == pytest.approx(tail(plain), rel=0.02)


@pytest.mark.parametrize("loss_chunk", [0, 1024])
def test_the_fused_classifier_learns_what_the_plain_step_learns(demo_data, loss_chunk):
    """training/kernels/classifier.py compiled for the GPU, in the bf16 compiled step, whole and chunked: the
    plain fp32 step's trace (its interpreter twin: tests/unit/test_kernels.py)."""
    plain = _losses(demo_data, fast=False)
    fused = _losses(demo_data, fast=True, fused_classifier=True, loss_chunk=loss_chunk)
    tail = lambda xs: sum(xs[-5:]) / 5  # noqa: E731
    assert tail(fused) == pytest.approx(tail(plain), rel=0.02)


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient", "fa4"])
def test_each_attention_kernel_matches_the_math_kernel(backend):
    """SDPA's kernels, and FlashAttention-4 (train.attention=fa4) where the package and the GPU allow it."""
    if backend == "fa4":
        from training.kernels import flash_attention4

        why = flash_attention4.available(CUDA)
        if why is not None:
            pytest.skip(why)
    cfg = GPTConfig(block_size=1024, n_layer=2)
    torch.manual_seed(0)
    model = GPT(cfg).to(CUDA)
    x = torch.randint(0, cfg.vocab_size, (4, 1024), device=CUDA)

    def run(attention):
        accel.configure(CUDA, tf32=False, attention=attention)
        model.use_flash_attention4(attention == "fa4")
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = model(x, x)
        loss.backward()
        return logits.float(), model.transformer.h[0].attn.c_attn.weight.grad.clone()

    ref_logits, ref_grad = run("math")
    try:
        logits, grad = run(backend)
    except RuntimeError as err:
        if "No available kernel" in str(err):
            pytest.skip(
                f"{backend} attention is not available with this torch/GPU: {str(err)[:120]}"
            )
        raise
    assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()
    assert (grad - ref_grad).abs().max() < 0.05 * ref_grad.abs().max()


def test_a_forced_attention_kernel_is_the_one_a_compiled_step_runs():
    """torch.compile's caches would serve a graph compiled under "auto" (flash or cuDNN baked in) to a run
    that forced the math kernel: the benchmark's "SDPA math" row once measured cuDNN attention that way."""
    from torch.profiler import ProfilerActivity, profile

    cfg = GPTConfig(block_size=256, n_layer=2)
    x = torch.randint(0, cfg.vocab_size, (4, 256), device=CUDA)

    def kernels(attention):
        accel.configure(CUDA, tf32=True, attention=attention)
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.compile(GPT(cfg).to(CUDA), dynamic=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, x)[1].backward()  # compiles
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(x, x)[1].backward()
            torch.cuda.synchronize()
        return " ".join(e.key.lower() for e in prof.key_averages())

    fused = ("flash", "fmha", "cudnn")  # library kernels; math attention is bmm + softmax
    assert any(k in kernels("auto") for k in fused)
    assert not any(k in kernels("math") for k in fused)


def test_training_job_on_cuda_with_compile_and_the_levers(demo_data, tmp_path):
    """The real job on the GPU: compiled, bf16, chunked loss, checkpoint and resume (CUDA RNG state)."""
    run = tmp_path / "run"
    sets = [
        "micro_batch=8",
        "seq_len=64",
        "total_batch_tokens=1024",
        "max_steps=6",
        "warmup_steps=2",
        "val_every=3",
        "val_tokens=1024",
        "sample_every=3",
        "checkpoint_every=3",
        "dtype=bfloat16",
        "compile=true",
        "loss_chunk=256",
        "device=cuda",
        f"data_url={demo_data}",
        f"run_dir={run}",
    ]

    def job(*extra):
        cmd = [
            sys.executable,
            "-m",
            "training.train",
            "--config",
            "tiny",
            *[a for s in [*sets, *extra] for a in ("--set", s)],
        ]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-4000:]
        return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]

    m = job()
    assert [r["step"] for r in m] == list(range(6)) and all(
        r["mfu"] is None or r["mfu"] > 0 for r in m
    )
    assert m[-1]["loss"] < m[0]["loss"]
    m = job("max_steps=8")  # resumes from the step-6 checkpoint, CUDA RNG state included
    assert [r["step"] for r in m] == list(range(8))
    cfg = json.loads((Path(run) / "config.json").read_text())
    assert cfg["resolved"]["device"].startswith("cuda")


def test_telemetry_on_cuda_times_the_rank_with_events_and_reads_its_memory():
    """Busy time ends when the GPU has made the last gradient (an event on the compute stream), not when the host
    queued it; memory comes from the allocator; NVML figures are numbers, or null without nvidia-ml-py."""
    from training.distributed import DistInfo
    from training.telemetry import RankTelemetry

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, n_layer=2)).to(CUDA)
    tel = RankTelemetry(
        2, DistInfo(), CUDA, last_grads=[model.transformer.wte.weight, model.transformer.wpe.weight]
    )
    x = torch.randint(0, 50257, (8, 256), device=CUDA)
    for _ in range(2):
        tel.step_started()
        t0 = time.perf_counter()
        model(x, x)[1].backward()
        torch.cuda._sleep(
            100_000_000
        )  # the GPU kept busy after the backward, as by a peer's all-reduce
        torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        tel.step_ended(step_s)
        assert 0 < tel.busy_s < step_s - 0.01
    [row] = tel.gather()
    assert row["mem_alloc_gb"] > 0 and row["mem_reserved_gb"] >= row["mem_alloc_gb"]
    assert all(
        row[k] is None or row[k] >= 0 for k in ("gpu_util", "sm_clock_mhz", "temp_c", "power_w")
    )


def test_a_gpu_node_passes_its_node_check(tmp_path):
    from cluster.node_check import run_node_check

    assert run_node_check(torch.cuda.device_count(), str(tmp_path)) is None
