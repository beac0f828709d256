"""Parity with the real `transformers` GPT-2 (random weights built locally: no hub access here)."""

import pytest
import torch
from helpers import small_hf_model

from common.errors import BadInput
from training.config import GPTConfig
from training.hf import export_hf_dir, gpt_from_hf, to_hf
from training.model import GPT
from training.sample import generate


def _max_diff(ours: GPT, hf, ids: torch.Tensor) -> float:
    with torch.no_grad():
        a, _ = ours.eval()(ids)
        b = hf(ids).logits
    return (a - b).abs().max().item()


@pytest.mark.parametrize("pad", [64, 1])
def test_import_small_model_logits_match(pad):
    hf = small_hf_model()
    ours = gpt_from_hf(hf, pad_vocab_to=pad)
    assert ours.config.padded_vocab_size == (50304 if pad == 64 else 50257)
    ids = torch.randint(0, 50257, (2, 40))
    assert _max_diff(ours, hf, ids) <= 1e-4


def test_import_full_124m_logits_match():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 124M shape, random weights
    ours = gpt_from_hf(hf)
    assert ours.num_parameters() == 124_439_808 + 47 * 768
    ids = torch.randint(0, 50257, (1, 64))
    assert _max_diff(ours, hf, ids) <= 1e-4


@pytest.mark.parametrize("preset", ["gpt2-350m", "gpt2-774m", "gpt2-1558m"])
def test_import_each_family_width_at_two_layers_logits_match(preset):
    from transformers import GPT2Config, GPT2LMHeadModel

    from training.config import load_config

    m = load_config(preset).model
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=m.n_head, n_embd=m.n_embd)
    ).eval()  # random weights
    ours = gpt_from_hf(hf)
    assert (ours.config.n_head, ours.config.n_embd, ours.config.padded_vocab_size) == (
        m.n_head,
        m.n_embd,
        50304,
    )
    ids = torch.randint(0, 50257, (1, 32))
    assert _max_diff(ours, hf, ids) <= 1e-4


@pytest.mark.parametrize("preset", ["gpt2-350m", "gpt2-774m", "gpt2-1558m"])
def test_export_of_each_family_width_at_two_layers_loads_in_transformers_with_the_same_logits(
    preset, tmp_path
):
    from transformers import GPT2LMHeadModel

    from training.config import load_config

    torch.manual_seed(0)
    ours = GPT(load_config(preset).model.model_copy(update={"n_layer": 2}))
    out = export_hf_dir(ours, tmp_path / "hf", with_tokenizer=False)
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert (hf.config.n_head, hf.config.n_embd, hf.config.vocab_size) == (
        ours.config.n_head,
        ours.config.n_embd,
        50257,
    )
    ids = torch.randint(0, 50257, (1, 32))
    with torch.no_grad():
        a = ours.eval()(ids)[0][..., :50257]
        b = hf(ids).logits
    assert (a - b).abs().max().item() <= 1e-4


def test_import_from_local_hf_directory(tmp_path):
    hf = small_hf_model()
    hf.save_pretrained(tmp_path)
    ours = gpt_from_hf(str(tmp_path))
    assert _max_diff(ours, hf, torch.randint(0, 50257, (1, 16))) <= 1e-4
    with pytest.raises(BadInput, match="config.json"):
        gpt_from_hf(str(tmp_path / "nope"))


def test_export_directory_loads_in_transformers_unchanged(tmp_path, enc):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    ours = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=32))
    with torch.no_grad():  # make biases/LN non-trivial so a mapping slip would show
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    out = export_hf_dir(ours, tmp_path / "hf")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    hf = GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True).eval()
    assert (
        hf.config.vocab_size == 50257
        and hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    )
    ids = torch.randint(0, 50257, (2, 32))
    assert _max_diff(ours, hf, ids) <= 1e-4
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "Hello, world! The quick brown fox jumps over the lazy dog.\n\n  Ünïcödé ✓"
    assert tok(text)["input_ids"] == enc.encode(text)
    assert tok.eos_token_id == 50256


def test_greedy_generation_equals_hf_generate():
    hf = small_hf_model(seed=3)
    ours = gpt_from_hf(hf)
    prompt = [15496, 11, 995, 0, 314]
    mine = generate(ours, prompt, max_new_tokens=20, temperature=0)[0]
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            do_sample=False,
            min_new_tokens=20,
            pad_token_id=50256,
        )[0].tolist()
    assert mine == theirs


def test_round_trip_ours_to_hf_to_ours_is_exact():
    ours = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    back = gpt_from_hf(to_hf(ours))
    for (n, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        if n in ("transformer.wte.weight", "lm_head.weight"):
            a, b = a[:50257], b[:50257]
        assert torch.equal(a, b), n
