"""Our Triton kernels (training/kernels/) against the PyTorch path they replace, on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, set by tests/unit/conftest.py before Triton is imported). On a GPU:
tests/e2e/test_gpu.py."""

import os

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture
def kernels():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton was imported before its interpreter was asked for")
    from training.kernels import add_layernorm

    return add_layernorm


@pytest.mark.parametrize(
    "shape, with_h", [((2, 5, 48), True), ((3, 7, 64), True), ((4, 33), False), ((1, 1, 100), True)]
)
def test_add_layernorm_matches_pytorch_forward_and_backward(kernels, shape, with_h):
    torch.manual_seed(0)
    C = shape[-1]
    ln = torch.nn.LayerNorm(C)
    with torch.no_grad():
        ln.weight.normal_(1, 0.2)
        ln.bias.normal_(0, 0.2)
    x = torch.randn(shape, requires_grad=True)
    h = torch.randn(shape, requires_grad=True) if with_h else None
    g_s, g_y = torch.randn(shape), torch.randn(shape)
    out = {}
    for name, fn in (("kernel", kernels.add_layernorm), ("torch", kernels.add_layernorm_reference)):
        for t in (x, h, ln.weight, ln.bias):
            if t is not None:
                t.grad = None
        s, y = fn(x, h, ln)
        ((s * g_s).sum() + (y * g_y).sum()).backward()
        grads = [x.grad, None if h is None else h.grad, ln.weight.grad, ln.bias.grad]
        out[name] = [s.detach(), y.detach(), *(None if g is None else g.clone() for g in grads)]
    for i, (a, b) in enumerate(zip(out["kernel"], out["torch"], strict=True)):
        if b is None:
            assert a is None
            continue
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (i, (a - b).abs().max())


def test_the_kernel_says_where_it_cannot_run(monkeypatch):
    from training.kernels import add_layernorm

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "run on CUDA" in add_layernorm.available(torch.device("cpu"))
    assert add_layernorm.available(torch.device("cuda")) is None


@pytest.mark.parametrize(
    "switches",
    [{}, {"n_layer": 3, "unet_skips": True, "value_embeds": 1}, {"n_layer": 4, "unet_skips": True}],
    ids=["gpt2", "odd-unet-value-embeds", "even-unet"],
)
def test_a_model_with_the_fused_kernel_learns_what_the_plain_one_learns(kernels, switches):
    """With U-net skips the fused path forms the same sums another way (training/model.py: _fused_blocks)."""
    from training.config import GPTConfig
    from training.model import GPT

    cfg = GPTConfig(block_size=16, n_head=2, n_embd=32, **{"n_layer": 2, **switches})
    torch.manual_seed(0)
    plain = GPT(cfg)
    fused = GPT(cfg)
    fused.load_state_dict(plain.state_dict())
    if (
        cfg.unet_skips
    ):  # weights other than their start of 1, so that a skip taken from the wrong block shows
        with torch.no_grad():
            for m in (plain, fused):
                m.transformer.skip_weights.copy_(torch.linspace(0.5, 1.5, cfg.unet_pairs))
    fused.fused_add_layernorm = True
    x = torch.randint(0, 50257, (2, 13))
    losses = []
    for model in (plain, fused):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("switch", ["fused_add_layernorm", "fused_classifier"])
def test_the_switch_is_refused_where_the_kernel_cannot_run(monkeypatch, switch):
    from training.config import ConfigError, load_config
    from training.train import check_kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = load_config("tiny", [f"train.{switch}=true"])
    with pytest.raises(ConfigError, match=f"train.{switch}: Triton kernels run on CUDA"):
        check_kernels(cfg, torch.device("cpu"))
    check_kernels(load_config("tiny"), torch.device("cpu"))  # off: nothing to refuse


def _classifier_reference(logits, targets, vocab, softcap):
    """Each row's cross-entropy and d(mean) / d logits by PyTorch's ops, in fp32."""
    ref = logits.float().clone().requires_grad_()
    x = softcap * torch.tanh(ref / softcap) if softcap else ref
    pad = torch.full((x.size(0), x.size(1) - vocab), float("-inf"))
    rows = torch.nn.functional.cross_entropy(
        torch.cat([x[:, :vocab], pad], 1), targets, reduction="none"
    )
    rows.mean().backward()
    return rows.detach(), ref.grad


@pytest.mark.parametrize("softcap", [0.0, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab, padded", [(100, 128), (300, 300), (5000, 5056)])
def test_the_fused_classifier_gives_the_loss_and_gradient_of_pytorchs_ops(
    kernels, softcap, dtype, vocab, padded
):
    from training.kernels.classifier import classify_

    torch.manual_seed(0)
    n = 9
    logits = (torch.randn(n, padded) * 4).to(dtype)
    targets = torch.randint(0, vocab, (n,))
    targets[0] = vocab - 1  # the last real column
    rows, grad = _classifier_reference(logits, targets, vocab, softcap)

    kept = logits.clone()
    assert torch.allclose(classify_(kept, targets, vocab, softcap), rows, atol=1e-5)
    assert torch.equal(kept, logits)  # without a grad_scale the logits are left as they were

    g = logits.clone()
    assert torch.allclose(classify_(g, targets, vocab, softcap, 1.0 / n), rows, atol=1e-5)
    assert g.dtype == dtype and not g[:, vocab:].any()  # the padding takes no gradient
    # the gradient in the logits' own dtype: fp32 to float error, bf16 to one unit of its last place (the
    # interpreter's cast may truncate where the GPU's rounds to nearest)
    tol = 1e-6 if dtype == torch.float32 else 2**-7 * grad.abs().max().item()
    assert (g.float() - grad).abs().max() <= tol


@pytest.mark.parametrize("chunk, softcap", [(0, 0.0), (5, 0.0), (5, 4.0)])
def test_a_model_with_the_fused_classifier_learns_what_the_plain_one_learns(
    kernels, chunk, softcap
):
    from training.config import GPTConfig
    from training.model import GPT

    cfg = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, logit_softcap=softcap)
    torch.manual_seed(0)
    plain = GPT(cfg)
    fused = GPT(cfg)
    fused.load_state_dict(plain.state_dict())
    fused.fused_classifier = True
    x = torch.randint(0, 50257, (2, 13))
    losses = []
    for model in (plain, fused):
        _, loss = model(x[:, :-1], x[:, 1:], loss_chunk=chunk)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name
    with torch.no_grad():  # validation: the loss alone
        assert torch.allclose(fused(x[:, :-1], x[:, 1:])[1], losses[0], atol=1e-5)


def test_flash_attention4_is_refused_in_one_line_where_it_cannot_run():
    from training.config import ConfigError, load_config
    from training.kernels import flash_attention4
    from training.train import check_kernels

    assert "not on cpu" in flash_attention4.available(torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.attention=fa4: FlashAttention-4 runs on Hopper"):
        check_kernels(load_config("tiny", ["train.attention=fa4"]), torch.device("cpu"))


@pytest.mark.parametrize("switches", [{}, {"pos_emb": "rope", "qk_norm": True, "value_embeds": 1}])
def test_flash_attention4_gets_and_gives_back_the_layout_it_works_in(monkeypatch, switches):
    """The library runs on Hopper and Blackwell GPUs only, so here a stand-in of the same contract (causal
    attention of (B, T, heads, head_dim) tensors, by SDPA) takes its place: what is checked is our side, the
    layout going in and coming back. The library itself is held to SDPA's math kernel in tests/e2e/test_gpu.py."""
    import torch.nn.functional as F

    from training.config import GPTConfig
    from training.kernels import flash_attention4
    from training.model import GPT

    seen = []

    def stand_in(q, k, v):
        seen.append(q.shape)
        bhtd = [t.transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*bhtd, is_causal=True).transpose(1, 2)

    monkeypatch.setattr(flash_attention4, "attention", stand_in)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, **switches))
    x = torch.randint(0, 50257, (3, 11))
    plain = model(x)[0]
    model.use_flash_attention4()
    assert torch.allclose(model(x)[0], plain, atol=1e-5)
    assert seen == [(3, 11, 2, 16)] * 2  # (B, T, heads, head_dim), once per layer
    model.use_flash_attention4(False)
    assert torch.equal(model(x)[0], plain) and len(seen) == 2
