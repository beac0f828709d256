"""The per-GPU memory estimate (training/memory.py) against the H100 and H200 peaks recorded in bench/results/, and the
check before sbatch that refuses a run too large for the partition's GPUs (cluster/validate.py)."""

import json

import pytest
from helpers import REPO

from cluster.spec import JobSpec
from cluster.validate import SpecError, check_gpu_memory, validate
from training.config import load_config
from training.memory import GB, estimate, fitting_micro_batch

RESULTS = REPO / "bench" / "results"
FAMILY = ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m")


def measured_rows():
    """(file, row) of every recorded 124M step the estimate models: padded vocabulary (the unpadded row ran 13 GB
    above the padded one, which the estimate does not model), and not the ablation's "SDPA math" row, which ran
    cuDNN's kernel from a cached graph (bench/results/README.md; -math.json holds the real one), nor CUDA graphs,
    whose private memory pool keeps its own copies of the step's buffers (+6.4 GB on the H100)."""
    for path in sorted(RESULTS.glob("train_throughput-*-h[12]00*.json")):
        for row in json.loads(path.read_text())["rows"]:
            if (
                row.get("mem_gb") is None
                or not row["pad_vocab"]
                or row.get("compile_mode") == "reduce-overhead"
            ):
                continue
            if "ablation" in path.name and row["attention"] == "math":
                continue
            yield path.name, row


def bench_config(row):
    b = row["micro_batch"]
    return load_config(
        "gpt2-124m",
        [
            f"micro_batch={b}",
            f"total_batch_tokens={b * 1024}",
            f"loss_chunk={row['loss_chunk']}",
            f"compile={str(row['compile']).lower()}",
            f"attention={row['attention']}",
            f"dtype={'bfloat16' if row['bf16'] else 'float32'}",
        ],
    )


def allocated(row) -> float:
    """The estimate of what the benchmark measured: one GPU (no DDP buckets), torch.cuda.max_memory_allocated
    (no CUDA context or NCCL buffers)."""
    return estimate(bench_config(row), world_size=1, overhead=0).total / GB


def test_estimate_is_within_15_percent_of_every_measured_peak():
    rows = list(measured_rows())
    names = {r["name"] for _, r in rows}
    assert {
        "baseline: build-nanogpt recipe",
        "+ chunked lm_head+CE (8192 tok)",
        "- torch.compile",
        "- bf16 autocast",
        "- fast attention (SDPA math)",
        "ours B=16",
        "ours B=32",
    } <= names
    assert {
        "train_throughput-20261126-h100.json",
        "train_throughput-20261125-h200-levers.json",
    } <= {n for n, _ in rows}
    for name, row in rows:
        est = allocated(row)
        assert abs(est / row["mem_gb"] - 1) <= 0.15, (name, row["name"], row["mem_gb"], est)


def test_the_recipe_and_its_chunked_loss_against_their_measured_peaks():
    levers = {
        r["name"]: r
        for r in json.loads((RESULTS / "train_throughput-20261125-h200-levers.json").read_text())[
            "rows"
        ]
    }
    recipe, chunked = (
        levers["baseline: build-nanogpt recipe"],
        levers["+ chunked lm_head+CE (8192 tok)"],
    )
    assert recipe["mem_gb"] == pytest.approx(43.8, abs=0.05) and chunked["mem_gb"] == pytest.approx(
        27.6, abs=0.05
    )
    assert allocated(recipe) == pytest.approx(recipe["mem_gb"], rel=0.15)  # 45.3 GB
    assert allocated(chunked) == pytest.approx(chunked["mem_gb"], rel=0.15)  # 28.1 GB
    # what the chunked loss saves: 16.1 GB measured, 17.2 estimated
    saved = allocated(recipe) - allocated(chunked)
    assert saved == pytest.approx(recipe["mem_gb"] - chunked["mem_gb"], rel=0.15)


@pytest.mark.parametrize("preset", FAMILY)
def test_estimate_grows_with_the_micro_batch_and_adds_ddp_and_overhead(preset):
    cfg = load_config(preset)
    parts = [estimate(cfg, world_size=8, micro_batch=b) for b in (1, 2, 4, 8, 16, 32, 64)]
    assert all(a.total < b.total for a, b in zip(parts, parts[1:]))
    assert parts[-1].activations == 64 * parts[0].activations  # linear in the tokens
    assert (
        len({p.states for p in parts}) == 1
    )  # weights, gradients and moments do not depend on the batch
    one = estimate(cfg, world_size=1, overhead=0)
    eight = estimate(cfg, world_size=8)
    assert (
        eight.total - one.total == eight.ddp_buckets + eight.overhead
        and eight.ddp_buckets == eight.weights
    )
    plain = estimate(cfg, world_size=8, micro_batch=64)
    chunked = estimate(load_config(preset, ["loss_chunk=8192"]), world_size=8, micro_batch=64)
    assert (
        chunked.logits * 8 == plain.logits and chunked.activations >= plain.activations
    )  # 65,536 tokens
    # the fused classifier keeps the bf16 logits alone (their gradient overwrites them): a third of the
    # compiled loss's bf16 + fp32, chunked or not
    fused = estimate(load_config(preset, ["fused_classifier=true"]), world_size=8, micro_batch=64)
    both = ["fused_classifier=true", "loss_chunk=8192"]
    assert fused.logits * 3 == plain.logits and fused.activations == chunked.activations
    assert (
        estimate(load_config(preset, both), world_size=8, micro_batch=64).logits * 24
        == plain.logits
    )


@pytest.mark.parametrize("preset", FAMILY)
def test_each_preset_micro_batch_is_the_largest_that_fits_an_80_gb_gpu(preset):
    cfg = load_config(preset)
    assert fitting_micro_batch(cfg, 80 * GB, world_size=8) == cfg.train.micro_batch
    assert (
        estimate(cfg, world_size=8).total
        <= 80 * GB
        < estimate(cfg, world_size=8, micro_batch=2 * cfg.train.micro_batch).total
    )


def test_fitting_micro_batch_respects_memory_and_the_global_batch():
    xl = load_config("gpt2-1558m")
    assert fitting_micro_batch(xl, 80 * GB, world_size=8) == 8
    assert fitting_micro_batch(xl, 141 * GB, world_size=8) == 16  # an H200
    assert (
        fitting_micro_batch(xl, 30 * GB, world_size=8) is None
    )  # its weights and moments alone are 25 GB
    small = load_config(
        "gpt2-124m"
    )  # 2**19 tokens over 8 ranks of 1024-token sequences: at most 64
    assert fitting_micro_batch(small, 1000 * GB, world_size=8) == 64
    assert fitting_micro_batch(small, 1000 * GB, world_size=64) == 8
    assert (
        fitting_micro_batch(small, 1000 * GB, world_size=3) is None
    )  # 3 ranks never split 2**19 tokens


def test_validate_refuses_the_1558m_at_a_micro_batch_too_large_for_80_gb_gpus():
    spec = JobSpec(nodes=1, gpus_per_node=8, gpu_mem_gb=80)
    with pytest.raises(SpecError) as err:
        validate(spec, "gpt2-1558m", ["micro_batch=32"], check_cluster=False, check_data=False)
    problems = str(err.value).splitlines()[1:]
    assert len(problems) == 1, problems
    line = problems[0]
    assert line.startswith("  - gpt2-1558m at micro_batch=32, seq_len=1024 needs ~143 GB per GPU (")
    assert "weights+grads+AdamW 25 GB" in line and "activations 96 GB" in line
    assert "have 80 GB: micro_batch=8 fits (set train.micro_batch=8;" in line
    assert (
        validate(
            spec, "gpt2-1558m", ["micro_batch=8"], check_cluster=False, check_data=False
        ).train.micro_batch
        == 8
    )
    assert (
        validate(spec, "gpt2-1558m", [], check_cluster=False, check_data=False).train.micro_batch
        == 8
    )
    # an H200 takes 16; a CPU job, or GPUs of unknown memory, are not checked
    validate(
        spec.model_copy(update={"gpu_mem_gb": 141}),
        "gpt2-1558m",
        ["micro_batch=16"],
        check_cluster=False,
        check_data=False,
    )
    cfg = load_config("gpt2-1558m", ["micro_batch=32"])
    assert check_gpu_memory(cfg, JobSpec(nodes=8, gpu_mem_gb=80), 80, "x") == []
    assert check_gpu_memory(cfg, JobSpec(gpus_per_node=8), None, "x") == []


def test_a_run_that_fits_no_micro_batch_says_what_else_to_try():
    cfg = load_config("gpt2-1558m")
    (line,) = check_gpu_memory(cfg, JobSpec(gpus_per_node=8), 24, "the GPUs of partition l4 (l4)")
    assert "but the GPUs of partition l4 (l4) have 24 GB: not even micro_batch=1 fits" in line
    assert "train.loss_chunk=8192" in line
