"""Our checkpoints as an lm-eval model, in-process: any architecture the run config can build (rotary, an untied
head, ...) is evaluated by lm-eval's tasks without a Hugging Face export, with the GPT-2 tokenizer it was
trained with.

    python -m evaluation.lm_eval_model --model gpt2repro --model_args checkpoint=RUN_OR_CHECKPOINT_URL \\
        --tasks hellaswag --limit 100       # lm-eval's own command line, with this model registered

`gpt2repro` is registered with lm-eval's model registry when this module is imported (lm-eval has no plugin
discovery for models), so the command above is lm-eval's CLI with that one import first; in Python,
`lm_eval.simple_evaluate(model="gpt2repro", model_args={"checkpoint": url}, ...)` after importing it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from common.tokenizer import EOT_TOKEN, get_encoding

NAME = "gpt2repro"
log = logging.getLogger(__name__)


@register_model(NAME)
class CheckpointLM(TemplateLM):
    """lm-eval's three request kinds on a GPT of training/model.py: log-likelihoods of continuations (batched,
    right-padded: the model is causal, so padding after a sequence changes none of its logits), rolling
    log-likelihoods of whole texts, and greedy generation."""

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        batch_size: int | str = 8,
        dtype: str = "float32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **_: Any,
    ):
        super().__init__()
        from training.accel import pick_device
        from training.checkpoint import load_model

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for CUDA unless told otherwise; as its own models do, use what there is
            log.warning("no CUDA device is visible: evaluating on the CPU")
            device = "cpu"
        self.device_ = pick_device(device, "device")
        model, cfg, self.step = load_model(checkpoint, self.device_)
        self.model = model.to(getattr(torch, dtype)).eval()
        self.batch = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = min(max_length or cfg.model.block_size, cfg.model.block_size)
        self.max_gen_toks = max_gen_toks
        self.enc = get_encoding()

    @property
    def eot_token_id(self) -> int:
        return EOT_TOKEN

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return self.enc.encode_ordinary(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.enc.decode(tokens)

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Per row of token ids, the log-probabilities (len-1, vocab) of each next token."""
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), EOT_TOKEN, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
        logits, _ = self.model(x[:, :-1].to(self.device_))
        lp = F.log_softmax(logits.float(), dim=-1).cpu()
        return [lp[i, : len(r) - 1] for i, r in enumerate(rows)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch):
            chunk = requests[start : start + self.batch]
            rows = [(ctx + cont)[-(self.max_length + 1) :] for _, ctx, cont in chunk]
            for (_, _, cont), lp in zip(chunk, self._logprobs(rows), strict=True):
                want = torch.tensor(cont)
                tail = lp[-len(cont) :]
                score = tail.gather(1, want[:, None]).sum().item()
                greedy = bool((tail.argmax(dim=-1) == want).all())
                out.append((score, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            tokens = self.tok_encode(context) or [EOT_TOKEN]
            new: list[int] = []
            text = ""
            for _ in range(budget):  # greedy: evaluations compare models, not samples
                window = (tokens + new)[-self.max_length :]
                logits, _ = self.model(torch.tensor([window], device=self.device_))
                nxt = int(logits[0, -1].argmax())
                if nxt == EOT_TOKEN:
                    break
                new.append(nxt)
                text = self.tok_decode(new)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with this model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
