"""The throughput benchmarks run (CPU smoke; GPU figures come from bench/results/), the optimised numeric path
does not change what is learned, and the fault-recovery benchmark measures a recovered run."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from training.config import load_config
from training.loader import ShardLoader
from training.model import GPT
from training.optim import configure_optimizer
from training.step import StepSetup, train_step


def test_benchmark_prints_rows_against_the_baseline_and_records_the_machine(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run(
        [
            sys.executable,
            "bench/train_throughput.py",
            "--config",
            "tiny",
            "--device",
            "cpu",
            "--micro-batches",
            "2",
            "--baseline-micro-batch",
            "2",
            "--seq-len",
            "32",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--ablation",
            "--levers",
            "--only",
            "fused AdamW,chunked lm_head,coordinate-descent",
            "--combine",
            "--no-compile",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert (
        "baseline: build-nanogpt recipe" in p.stdout
        and "- fused AdamW" in p.stdout
        and "1.00x" in p.stdout
    )
    res = json.loads(out.read_text())
    assert res["machine"]["torch"] == torch.__version__
    assert [r["name"] for r in res["rows"]][:4] == [
        "baseline: build-nanogpt recipe",
        "- fused AdamW",
        "+ chunked lm_head+CE (8192 tok)",
        "+ coordinate-descent tuning of the fused kernels",
    ]
    assert [r["coordinate_descent"] for r in res["rows"]][:4] == [False, False, False, True]
    # --combine: the two levers together when both gained (on a CPU, at the noise's whim), never an ablation
    assert [r["name"] for r in res["rows"][4:]] in (
        [],
        [
            "best combination: chunked lm_head+CE (8192 tok) + coordinate-descent tuning of the fused kernels"
        ],
        [
            "best combination: coordinate-descent tuning of the fused kernels + chunked lm_head+CE (8192 tok)"
        ],
    )
    assert all(
        r["tokens_per_s"] > 0 and r["mfu"] is None for r in res["rows"]
    )  # no invented MFU on CPU
    md = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--render", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert md.startswith("| variant | B | ms/step |") and "| - fused AdamW | 2 |" in md
    assert (
        f"Measured on CPU, torch {torch.__version__}" in md
    )  # a figure always comes with its machine


def _losses(demo_data, bf16: bool, steps=50, loss_chunk=0, compile=False):
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = configure_optimizer(model, lr=3e-3, weight_decay=0.1)
    run = torch.compile(model) if compile else model
    x, y = ShardLoader(demo_data, "train", 4, 64).next_batch()
    setup = StepSetup(
        run,
        opt,
        lambda: (x, y),
        grad_accum=1,
        device=torch.device("cpu"),
        grad_clip=1.0,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        loss_chunk=loss_chunk,
    )
    return [train_step(setup, lr=3e-3).loss.item() for _ in range(steps)]


@pytest.fixture(scope="module")
def fp32(demo_data):
    """The plain fp32 trace both comparisons below are measured against."""
    return _losses(demo_data, False)


def test_bf16_autocast_and_chunked_loss_match_fp32_within_bf16_tolerance(demo_data, fp32):
    bf16 = _losses(demo_data, True)
    chunked = _losses(demo_data, True, loss_chunk=100)  # 256 tokens per micro-batch: 100 + 100 + 56
    assert fp32[-1] < fp32[0] - 3  # it learned something, so the comparison means something
    assert abs(bf16[-1] - fp32[-1]) < 0.05 * fp32[-1]
    assert abs(chunked[-1] - fp32[-1]) < 0.05 * fp32[-1]


@pytest.mark.slow
def test_compiled_bf16_chunked_step_matches_fp32_after_50_steps(demo_data, fp32):
    """The optimised path as far as a CPU has it (CUDA's flash attention and fused AdamW: tests/e2e/test_gpu.py)."""
    fast = _losses(demo_data, True, loss_chunk=100, compile=True)
    assert abs(fast[-1] - fp32[-1]) < 0.05 * fp32[-1]


def test_tokenize_benchmark_prints_ours_against_the_reference_and_the_ceiling():
    p = subprocess.run(
        [
            sys.executable,
            "bench/tokenize_throughput.py",
            "--tokens",
            "3e5",
            "--shard-tokens",
            "50000",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for row in (
        "ceiling:",
        "reference:",
        "ours:",
        "ratio ours/reference:",
        "-process ceiling",
        "coordinator      ours:",
        "[documents from a Python list]",
        "[documents from parquet files",
        "single thread: encode_ordinary",
        "of encode_ordinary,",
        "of encode_to_numpy",
    ):
        assert row in p.stdout, p.stdout
    assert p.stdout.count("ratio ours/reference:") == 2  # one block per source


def test_fault_recovery_benchmark_records_a_killed_run_recovered_without_losing_a_step(tmp_path):
    """The smallest run of bench/fault_recovery.py: one killed training process, the real flow resubmitting it."""
    out = tmp_path / "r.json"
    p = subprocess.run(
        [
            sys.executable,
            "bench/fault_recovery.py",
            "--faults",
            "killed",
            "--repeat",
            "1",
            "--max-steps",
            "8",
            "--checkpoint-every",
            "3",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    [row] = res["rows"]
    assert row["fault"] == "killed" and row["recovered"], row["submissions"]
    assert 0 < row["detected_s"] < 10  # seen at the flow's next poll (0.5 s), not by a time-out
    assert row["first_new_step_s"] > 0
    assert row["steps_lost"] == 0 and row["steps_logged_twice"] == 0
    assert 0 <= row["steps_redone"] <= res["settings"]["checkpoint_every"]
    assert res["machine"]["torch"] == torch.__version__ and res["machine"]["cpus"] == os.cpu_count()
    assert res["settings"]["poll_seconds"] == 0.5 and res["summary"][0]["fault"] == "killed"
    md = subprocess.run(
        [sys.executable, "bench/fault_recovery.py", "--render", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert md.startswith("| fault | detected after s |") and "| killed |" in md
    assert f"Measured on {os.cpu_count()} x" in md  # a figure always comes with its machine


def test_checkpoint_overhead_benchmark_sets_asynchronous_writes_beside_synchronous_ones(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run(
        [
            sys.executable,
            "bench/checkpoint_overhead.py",
            "--config",
            "tiny",
            "--steps",
            "6",
            "--checkpoint-every",
            "2",
            "--repeat",
            "1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    none, sync, asyn = res["summary"]
    assert (none["variant"], sync["variant"], asyn["variant"]) == (
        "no checkpoints",
        "synchronous",
        "asynchronous",
    )
    assert none["vs_none"] == 0 and none["block_s"] is None  # the anchor
    for r in res["rows"]:
        if r["variant"] == "no checkpoints":
            assert r["checkpoints"] == 0 and r["overhead"] == 0
            continue
        assert (
            r["checkpoints"] == 2 and len(r["write_s"]) >= 1
        )  # steps 2 and 4; step 6's is the last
        assert all(b > 0 for b in r["block_s"]) and r["overhead"] > 0
    # synchronous: the loop waits for the whole write
    assert all(
        b >= w
        for r in res["rows"]
        if r["variant"] == "synchronous"
        for b, w in zip(r["block_s"], r["write_s"])
    )
    assert res["settings"]["checkpoint_mb"] > 0 and res["machine"]["cpus"] == os.cpu_count()
    assert (
        "| no checkpoints |" in p.stdout
        and "| synchronous |" in p.stdout
        and "| asynchronous |" in p.stdout
    )


def test_store_overhead_benchmark_sets_an_s3_run_directory_beside_a_local_one(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run(
        [
            sys.executable,
            "bench/store_overhead.py",
            "--steps",
            "6",
            "--sample-every",
            "2",
            "--repeat",
            "1",
            "--set",
            "micro_batch=2",
            "--set",
            "seq_len=32",
            "--set",
            "total_batch_tokens=64",
            "--set",
            "val_tokens=64",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    local, s3 = res["summary"]
    assert (local["variant"], s3["variant"]) == ("local", "s3") and local[
        "step_ms_vs_local"
    ] == 0  # the anchor
    for r in res["rows"]:  # every line reached its store: read back from S3 for the s3 run
        assert r["steps"] == 6 and r["samples"] == 3  # steps 2, 4 and the last
        assert r["step_ms"] > 0 and r["loop_ms"] > 0 and r["sample_loop_ms"] > 0
    assert res["machine"]["cpus"] == os.cpu_count() and res["settings"]["sample_every"] == 2
    md = subprocess.run(
        [sys.executable, "bench/store_overhead.py", "--render", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert md.startswith("| run directory | step ms |") and "| local |" in md and "| s3 |" in md
    assert f"Measured on {os.cpu_count()} x" in md  # a figure always comes with its machine


def test_the_best_combination_takes_the_levers_that_gained_and_the_faster_of_two_that_clash():
    sys.path.insert(0, str(REPO / "bench"))
    import train_throughput as tt

    base = tt.Variant("baseline", 64)
    r = dataclasses.replace

    def row(v, tok_s):
        return {**dataclasses.asdict(v), "tokens_per_s": tok_s}

    rows = [
        row(base, 100.0),
        row(r(base, name="+ flash", attention="flash"), 103.0),
        row(
            r(base, name="+ cuDNN", attention="cudnn"), 105.0
        ),  # clashes with flash: the faster stays
        row(r(base, name="+ chunked", loss_chunk=8192), 110.0),
        row(r(base, name="+ chunked, B=96", micro_batch=96, loss_chunk=8192), 112.0),
        row(r(base, name="+ ours", fused_add_ln=True), 100.5),  # within the noise: left out
        {**dataclasses.asdict(r(base, name="+ broken", fused_classifier=True)), "error": "x"},
    ]
    best = tt.best_combination(base, rows)
    assert best.name == "best combination: chunked, B=96 + cuDNN"  # "+ chunked" is inside "B=96"
    assert (best.micro_batch, best.loss_chunk, best.attention) == (96, 8192, "cudnn")
    assert not best.fused_add_ln and not best.fused_classifier
    assert tt.best_combination(base, rows[:2]) is None  # one lever is no combination


def test_the_fast_recipes_switches_are_rows_each_on_its_own_then_all_together():
    """What each switch of a fast preset costs per step: the rows follow the preset (its model switches and its
    optimizer, not its schedule), and a preset of another shape is refused."""
    sys.path.insert(0, str(REPO / "bench"))
    import train_throughput as tt

    base = tt.Variant("baseline", 8)
    rows = tt.recipe_switches(base, "gpt2-124m", "gpt2-124m-fast")
    fast = load_config("gpt2-124m-fast")
    assert rows[-1].name == "+ all of gpt2-124m-fast's switches"
    singles = {r.name: r.overrides for r in rows[:-1]}
    assert singles["+ model.pos_emb = rope"] == ("model.pos_emb=rope",)
    assert singles["+ model.tie_embeddings = false"] == ("model.tie_embeddings=false",)
    assert singles["+ optim.optimizer = muon"] == (
        "optim.optimizer=muon",
        f"optim.muon_lr={fast.optim.muon_lr}",
    )
    assert not any("schedule" in name for name in singles)  # no cost of its own per step
    assert len(rows[-1].overrides) == len(singles) + 1
    with pytest.raises(
        ValueError, match="demo-fast is not tiny with switches: its model.block_size"
    ):
        tt.recipe_switches(base, "tiny", "demo-fast")
    # measured through the step as any row is (a CPU smoke: the real figures come from a GPU)
    on_cpu = dataclasses.replace(rows[-1], compile=False)
    row = tt.measure(load_config("demo"), on_cpu, torch.device("cpu"), 16, 0, 1)
    assert row["tokens_per_s"] > 0 and row["overrides"] == rows[-1].overrides


def _recipe_compare(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """bench/recipe_compare.py with these arguments, as a user runs it."""
    return subprocess.run(
        [sys.executable, "bench/recipe_compare.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_recipe_comparison_runs_both_recipes_side_by_side_and_its_arithmetic_holds(
    demo_data, tmp_path
):
    sys.path.insert(0, str(REPO / "bench"))
    import recipe_compare as rc

    # curves of (tokens, seconds, val loss): the fast one reaches the other's final 3.0 at 2,500 tokens
    base = [(1000, 10.0, 4.0), (2000, 20.0, 3.5), (4000, 40.0, 3.0)]
    fast = [(1000, 20.0, 3.6), (2000, 40.0, 3.2), (3000, 60.0, 2.8), (4000, 80.0, 2.6)]
    assert rc.tokens_to(fast, 3.0) == pytest.approx(2500)
    assert rc.tokens_to(base, 2.0) is None
    assert rc.at(fast, 30.0, 1) == pytest.approx(3.4) and rc.at(fast, 5.0, 1) is None
    rows = [
        {"recipe": "build-nanogpt", "curve": base, "final_val": 3.0, "step_ms": 10.0},
        {"recipe": "fast", "curve": fast, "final_val": 2.6, "step_ms": 20.0},
    ]
    s = {r["recipe"]: r for r in rc.summarise(rows)}
    assert s["fast"]["token_ratio"] == pytest.approx(2500 / 4000)
    assert s["fast"]["equal_wall_s"] == 40.0 and s["fast"]["val_at_equal_wall"] == pytest.approx(
        3.2
    )
    assert s["build-nanogpt"]["val_at_equal_wall"] == pytest.approx(3.0)
    # a batch warm-up trains fewer tokens in the same steps: every recipe is also read at the fewest tokens
    warm = [(500, 10.0, 3.6), (1500, 30.0, 3.0), (3500, 70.0, 2.5)]
    rows.append(
        {"recipe": "fast + batch warm-up", "curve": warm, "final_val": 2.5, "step_ms": 20.0}
    )
    s = {r["recipe"]: r for r in rc.summarise(rows)}
    assert s["fast"]["equal_tokens"] == 3500
    # fast at 3,500 tokens: halfway from 2.8 to 2.6; the warm-up reaches fast's 2.6 80% of the way to 3,500
    assert s["fast"]["val_at_equal_tokens"] == pytest.approx(2.7)
    assert s["fast + batch warm-up"]["tokens_to_fast"] == pytest.approx(3100)
    assert s["fast + batch warm-up"]["token_ratio"] == pytest.approx(1500 / 4000)
    machine = {"cpus": 2, "cpu_model": "x", "torch": "t", "python": "p"}
    settings = {"scale": "demo", "steps": 3, "seeds": "0", "data": "d"}
    md = rc.table(
        {"settings": settings, "summary": list(s.values()), "machine": machine, "time": "t"}
    )
    assert "| val loss at 3,500 tokens |" in md and "| fast + batch warm-up | 3,500 |" in md

    out = tmp_path / "r.json"
    runs = ["--work", str(tmp_path / "runs")]
    base = [
        "--data",
        demo_data,
        "--steps",
        "6",
        "--val-every",
        "3",
        "--seeds",
        "0",
        "--threads",
        "1",
    ]
    p = _recipe_compare([*base, "--out", str(out), *runs], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["recipe"] for r in res["summary"]] == ["build-nanogpt", "fast"]
    assert all(len(r["curve"]) == 3 for r in res["rows"])  # validations at steps 0, 3 and the last
    assert "| fast |" in p.stdout and "Measured on" in p.stdout
    # each final checkpoint also read on the whole val split, once
    kept = json.loads((tmp_path / "runs" / "fast-seed0" / "whole_val.json").read_text())
    assert (
        kept["step"] == 6 and kept["tokens"] > 8192
    )  # more than a validation during training reads
    assert {r["recipe"]: r["whole_val"] for r in res["rows"]}["fast"] == round(kept["val_loss"], 5)
    assert "| on the whole val split |" in p.stdout
    assert out.with_suffix(".png").stat().st_size > 1000
    # run again on the same runs: nothing is trained twice, and the comparison is the same
    again = _recipe_compare([*base, "--out", str(tmp_path / "again.json"), *runs], timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("trained before") == 2
    assert json.loads((tmp_path / "again.json").read_text())["summary"] == res["summary"]
    # a switch the fast recipe leaves off, measured on top of it: only that recipe is trained
    more = "model.value_embeds=1 model.unet_skips=true"
    assert rc.recipes(False, 0, [more])[f"fast + {more}"] == [
        *rc.recipes(False)["fast"],
        *more.split(),
    ]
    plus = _recipe_compare(
        [*base, "--out", str(tmp_path / "plus.json"), *runs, "--plus", more], timeout=300
    )
    assert plus.returncode == 0 and plus.stderr.count("trained before") == 2, plus.stderr[-3000:]
    summary = json.loads((tmp_path / "plus.json").read_text())["summary"]
    assert [r["recipe"] for r in summary] == ["build-nanogpt", "fast", f"fast + {more}"]
    config = json.loads(next((tmp_path / "runs").glob("fast+*-seed0/config.json")).read_text())
    assert config["model"]["value_embeds"] == 1 and config["model"]["unet_skips"] is True

    # results of other seeds, measured alike, merge into one comparison; others are refused in one line
    other = dict(res, rows=[dict(r, seed=1, final_val=r["final_val"] + 0.5) for r in res["rows"]])
    (tmp_path / "seed1.json").write_text(json.dumps(other))
    merged = tmp_path / "merged.json"
    assert rc.main(["--merge", str(out), str(tmp_path / "seed1.json"), "--out", str(merged)]) == 0
    both = {r["recipe"]: r for r in json.loads(merged.read_text())["summary"]}
    assert both["fast"]["seeds"] == 2 and both["fast"]["final_val"] == pytest.approx(
        {r["recipe"]: r for r in res["summary"]}["fast"]["final_val"] + 0.25
    )
    unlike = dict(other, settings=dict(other["settings"], steps=7))
    (tmp_path / "unlike.json").write_text(json.dumps(unlike))
    (tmp_path / "other.json").write_text(json.dumps({"rows": "x"}))
    for files in ([out, tmp_path / "unlike.json"], [out, out], [out, tmp_path / "other.json"]):
        with pytest.raises(SystemExit) as refused:
            rc.main(["--merge", *map(str, files), "--out", str(merged)])
        assert refused.value.code == 2


def test_a_recipe_the_config_rejects_is_one_line_before_any_recipe_trains(
    demo_data, tmp_path, capsys
):
    sys.path.insert(0, str(REPO / "bench"))
    import recipe_compare as rc

    work = tmp_path / "runs"
    with pytest.raises(SystemExit) as refused:
        rc.main(
            [
                "--data",
                demo_data,
                "--steps",
                "3",
                "--work",
                str(work),
                "--plus",
                "model.value_embeds=9",
            ]
        )
    assert refused.value.code == 2 and not work.exists()  # the first recipes did not train either
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "error: recipe 'fast + model.value_embeds=9': invalid config" in err
    )  # argparse's one line
    assert "at most 1" in err


def test_the_124m_comparison_trains_the_two_presets_and_a_compiled_first_step_is_not_its_wall_time(
    demo_data, tmp_path
):
    sys.path.insert(0, str(REPO / "bench"))
    import recipe_compare as rc

    from training.config import load_config

    # what the GPU comparison calls fast is the gpt2-124m-fast preset, whatever either file comes to say
    preset, scale = rc.SCALES["gpt2-124m"]
    fast = load_config(preset, [*scale, *rc.recipes(False)["fast"]]).model_dump()
    shipped = load_config("gpt2-124m-fast", scale).model_dump()
    for cfg in (fast, shipped):
        cfg.pop("name"), cfg["train"].pop("run_dir")
    assert fast == shipped

    # the scale's path end to end (the preset, its overrides, the whole-val pass), on a model shrunk to a CPU
    shrink = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "compile=false"]
    shrink += ["micro_batch=2", "seq_len=64", "total_batch_tokens=256", "val_tokens=256"]
    out = tmp_path / "r.json"
    p = _recipe_compare(
        ["--data", demo_data, "--scale", "gpt2-124m", "--steps", "4", "--val-every", "2"]
        + ["--seeds", "0", "--threads", "1", *[x for kv in shrink for x in ("--set", kv)]]
        + ["--out", str(out), "--work", str(tmp_path / "runs")],
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["recipe"] for r in res["summary"]] == ["build-nanogpt", "fast"]
    config = json.loads((tmp_path / "runs" / "fast-seed0" / "config.json").read_text())
    assert config["model"]["pos_emb"] == "rope" and config["optim"]["optimizer"] == "muon"
    assert config["optim"]["warmup_steps"] == 20 and config["train"]["micro_batch"] == 2
    assert all(r["whole_val"] > 0 for r in res["rows"])

    # a first step that compiled for a minute counts as a median step in the time axis
    run = tmp_path / "compiled"
    run.mkdir()
    steps = [
        dict(step=i, step_ms=60_000.0 if i == 0 else 100.0, tokens_seen=i + 1) for i in range(5)
    ]
    steps[0]["val_loss"], steps[4]["val_loss"] = 5.0, 4.0
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(s) for s in steps))
    row = rc.collected(run, "x", 0)
    assert row["curve"] == [(1, 0.1, 5.0), (5, 0.5, 4.0)] and row["step_ms"] == 100.0
