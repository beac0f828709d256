import numpy as np
import pytest

from training.config import ConfigError, RunConfig, load_config


def test_presets_load_and_match_the_recipe():
    cfg = load_config("gpt2-124m")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (
        12,
        12,
        768,
        1024,
    )
    assert cfg.model.padded_vocab_size == 50304
    assert cfg.train.total_batch_tokens == 524288 and cfg.train.max_steps == 19073
    assert (
        cfg.optim.max_lr == 6e-4 and cfg.optim.warmup_steps == 715 and cfg.optim.weight_decay == 0.1
    )
    assert cfg.grad_accum_steps(world_size=8) == 1 and cfg.grad_accum_steps(world_size=1) == 8
    tiny = load_config("tiny")
    assert tiny.model.n_layer <= 2 and tiny.train.seq_len <= tiny.model.block_size


# The published GPT-2 shapes and Hugging Face's parameter counts for them (tied wte/lm_head, 50257 rows), and
# llm.c's run scripts (karpathy/llm.c scripts/run_gpt2_*.sh): max LR, final LR fraction, tokens per step, steps.
FAMILY = {
    "gpt2-350m": ((24, 16, 1024), 354_823_168, (3e-4, 0.0, 524288, 60000), 32),
    "gpt2-774m": ((36, 20, 1280), 774_030_080, (2.5e-4, 0.0, 524288, 286102), 16),
    "gpt2-1558m": ((48, 25, 1600), 1_557_611_200, (6e-4, 0.1, 1048576, 32000), 8),
}


@pytest.mark.parametrize("preset", FAMILY)
def test_gpt2_family_presets_have_the_published_shapes_and_llmc_hyperparameters(preset):
    import torch

    from training.memory import num_parameters
    from training.model import GPT

    shape, hf_params, (lr, floor, batch, steps), micro = FAMILY[preset]
    cfg = load_config(preset)
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert cfg.name == preset and (m.n_layer, m.n_head, m.n_embd) == shape
    assert (m.block_size, m.vocab_size, m.padded_vocab_size) == (1024, 50257, 50304)
    with torch.device("meta"):  # the full-size model, without allocating its weights
        model = GPT(m)
    padding = (50304 - 50257) * m.n_embd
    assert model.num_parameters() == num_parameters(m) == hf_params + padding
    assert (o.max_lr, o.min_lr_ratio, o.warmup_steps, o.weight_decay) == (lr, floor, 700, 0.1)
    assert (t.total_batch_tokens, t.max_steps, t.micro_batch, t.seq_len) == (
        batch,
        steps,
        micro,
        1024,
    )
    assert t.compile and t.dtype == "auto" and t.loss_chunk == 0
    assert cfg.grad_accum_steps(8) == batch // (micro * 1024 * 8) and cfg.val_steps_per_rank(8) >= 1
    assert cfg.checkpoint.keep_every % cfg.checkpoint.checkpoint_every == 0


def test_overrides_by_dotted_path_and_unique_bare_name():
    cfg = load_config(
        "tiny", ["optim.max_lr=3e-3", "max_steps=7", "compile=true", "run_dir=s3://b/runs/x"]
    )
    assert cfg.optim.max_lr == 3e-3 and cfg.train.max_steps == 7 and cfg.train.compile is True
    assert cfg.train.run_dir == "s3://b/runs/x"


@pytest.mark.parametrize(
    "override, needle",
    [
        (["max_lrr=1"], "max_lr"),  # typo: suggests the real name
        (["optim.max_lr=-1"], "optim.max_lr"),  # invalid value names the field
        (["micro_batch=3"], "train.total_batch_tokens"),  # batch does not split into micro-batches
        (["vocab_size=1000"], "model.vocab_size"),  # too small for the GPT-2 tokenizer
        (["seq_len=128"], "train.seq_len"),  # longer than the model's context
        (["n_head=3"], "model.n_embd"),  # heads must divide the width
        (["compile=maybe"], "train.compile"),
        (["compile_mode=fast"], "train.compile_mode"),
        (["attention=flash2"], "train.attention"),
        (["loss_chunk=-1"], "train.loss_chunk"),
    ],
)
def test_bad_values_are_clear_errors_naming_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", override)
    assert needle in str(err.value)


def test_typo_in_a_toml_file_is_rejected(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[optim]\nmax_lr = 1e-3\nwarmpu_steps = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "optim.warmpu_steps" in str(err.value) and "warmup_steps" in str(err.value)


def test_world_size_must_divide_the_batch():
    cfg = load_config("tiny")  # 512 tokens = 4 x 64 x 2 micro-steps on one rank
    assert cfg.grad_accum_steps(1) == 2 and cfg.grad_accum_steps(2) == 1
    with pytest.raises(ConfigError, match="world_size"):
        cfg.grad_accum_steps(3)
    # val reads the same tokens on any world size that divides them
    assert cfg.val_steps_per_rank(1) == 4 and cfg.val_steps_per_rank(4) == 1
    with pytest.raises(ConfigError, match="eval.val_tokens"):
        cfg.val_steps_per_rank(3)
    big = load_config("gpt2-124m")
    assert big.val_steps_per_rank(8) == 20 and big.grad_accum_steps(8) == 1


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("gpt2-125m")


def test_resolved_config_round_trips_through_json():
    from training.config import config_from_json

    cfg = load_config("tiny", ["seed=7"])
    assert config_from_json(cfg.to_json()) == cfg
    assert isinstance(cfg, RunConfig)


def test_a_cuda_attention_kernel_on_a_cpu_run_is_an_error_before_any_model():
    import torch

    from training import accel

    with pytest.raises(ConfigError, match="train.attention='flash' picks a CUDA kernel"):
        accel.configure(torch.device("cpu"), tf32=True, attention="flash")
    accel.configure(
        torch.device("cpu"), tf32=True, attention="auto"
    )  # the default works everywhere


def test_arrays_and_configs_keep_their_numbers_in_range():
    from training.config import ConfigError, load_config

    bad_values = ("max_lr=inf", "max_lr=nan", "grad_clip=-1", "warmup_steps=-5", "seed=-1")
    # numpy's 32-bit seeds, a sample prompt to sample from, a padding that is a multiple, not a size
    for bad in (*bad_values, f"seed={2**32}", 'sample_prompt=""', "pad_vocab_to=1000000000"):
        with pytest.raises(ConfigError):
            load_config("tiny", [bad])
    assert np.isfinite(load_config("tiny").optim.max_lr)
    for where in (
        'run_dir=""',
        "run_dir=memory://runs/r",
    ):  # the current folder; a store gone at exit
        with pytest.raises(ConfigError, match="no place for a run"):
            load_config("tiny", [where])
    for url in ("run_dir=sftp://alice:s3cr3t@host/runs/r", "data_url=https://alice:s3cr3t@host/d"):
        with pytest.raises(ConfigError, match="carries a password in its URL") as err:
            load_config("tiny", [url])
        assert "s3cr3t" not in str(err.value)


# what a fast preset may change of its recipe: the fast recipe's switches, their learning rate and schedule
# shape, and where and how long it runs
FAST_SWITCHES = {
    "model.pos_emb",
    "model.qk_norm",
    "model.mlp_act",
    "model.tie_embeddings",
    "model.zero_init_proj",
    "model.logit_softcap",
    "model.value_embeds",
    "model.unet_skips",
    "optim.optimizer",
    "optim.muon_lr",
    "optim.schedule",
    "optim.cooldown_frac",
    "train.batch_warmup_steps",
    "train.batch_warmup_start",
    "train.micro_batch",  # how a step's batch is cut, not what it holds: room for a batch warm-up
    "train.run_dir",
    "train.max_steps",
    "name",
}


@pytest.mark.parametrize("fast, faithful", [("demo-fast", "demo"), ("gpt2-124m-fast", "gpt2-124m")])
def test_a_fast_preset_is_its_recipe_with_the_fast_switches_and_nothing_else(fast, faithful):
    a, b = load_config(fast).model_dump(), load_config(faithful).model_dump()
    changed = {
        f"{section}.{k}"
        for section, fields in a.items()
        if isinstance(fields, dict)
        for k in fields
        if fields[k] != b[section][k]
    } | ({"name"} if a["name"] != b["name"] else set())
    assert changed <= FAST_SWITCHES, changed - FAST_SWITCHES
    assert {"optim.optimizer", "model.pos_emb", "model.mlp_act", "optim.schedule"} <= changed
    assert (
        load_config(fast).train.run_dir != load_config(faithful).train.run_dir
    )  # never one run dir
