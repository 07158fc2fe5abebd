"""`nemotron3` as an lm-evaluation-harness model: importing this module registers it with lm-eval.

    import nemotron3.eval.harness  # noqa: F401   (lm-eval 0.4.13 has no entry point for outside models)
    lm_eval.simple_evaluate(model="nemotron3", model_args="pretrained=DIR,think=off", tasks=[...])

    nemotron3 lm-eval --model nemotron3 --model_args pretrained=DIR,device=cpu --tasks TASK [--apply_chat_template]

Model arguments: `pretrained` (a checkpoint folder), `device` (cpu, cuda, ...), `dtype` (float32, bfloat16),
`batch_size` (rows per batch; "auto" is 32), `max_length` (context window; default the config's
max_position_embeddings), `max_gen_toks` (default 256), `think` (on, off or budget:N: the reasoning mode of the
chat template and the engine's thinking budget), `speculative` (MTP drafted tokens, greedy only), `seed`.

- `generate_until`: requests grouped by their generation kwargs, longest first, `batch_size` at a time through
  `Engine.stream` (the engine's batched decode). A row stops at the checkpoint's end-of-sequence / end-of-turn
  token, or once its answer holds one of the `until` strings; the reply is the answer part (after `</think>`,
  nothing when the reasoning never closed) cut at the first stop string, as the `hf` backend returns it with
  `think_end_token`.
- `loglikelihood` / `loglikelihood_rolling`: lm-eval's TemplateLM tokenization (context and continuation split
  after encoding them together; an empty context is the BOS token), then batched right-padded forwards
  (`hidden_states`, the LM head only at the scored positions), in float32 log-softmax. Padding is exact: the
  model is causal, so the padding after a row never reaches its scored positions. Rolling windows are lm-eval's
  own (`get_rolling_token_windows`).
- `apply_chat_template`: `chat.render` in the `think` mode, the same prompt `nemotron3 eval` builds.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import lm_eval.models  # noqa: F401  (the harness's own models first: registering ours must not hide them)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from nemotron3.engine import Engine
from nemotron3.engine.folder import open_folder
from nemotron3.engine.text import encode_prompt
from nemotron3.eval.extract import answer_part
from nemotron3.eval.runner import completion_text, parse_modes

THINK_START, THINK_END = "<think>", "</think>"


def _int(name: str, value: Any, default: int) -> int:
    if value is None or value == "auto":
        return default
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {name}={value!r}: expected an integer") from None
    if out < 0:
        raise ValueError(f"model_args {name}={value!r}: expected an integer >= 0")
    return out


@register_model("nemotron3")
class Nemotron3LM(TemplateLM):
    """A nemotron3 checkpoint behind lm-eval's model API (module docstring)."""

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str = "float32", batch_size: Any = 32,
                 max_length: Any = None, max_gen_toks: Any = 256, think: str = "on", speculative: Any = 0,
                 seed: Any = 0, max_batch_size: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"model_args {', '.join(sorted(unknown))}: not an argument of the nemotron3 model "
                             "(pretrained, device, dtype, batch_size, max_length, max_gen_toks, think, speculative, "
                             "seed)")
        modes = parse_modes(str(think).replace("budget_", "budget:"))
        if len(modes) != 1:
            raise ValueError(f"model_args think={think!r}: give one mode, on, off or budget:N")
        self.mode = modes[0]
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model_args dtype={dtype!r}: expected float32 or bfloat16")
        served = open_folder(pretrained, dtype)
        if served.tokenizer is None:
            raise ValueError(f"{pretrained} has no tokenizer.json; lm-eval scores text")
        if self.mode.budget is not None and not served.has_think:
            raise ValueError(f"model_args think={think}: {pretrained}'s tokenizer has no <think> / </think> tokens")
        model = served.engine.model
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's command line defaults to cuda
            logging.getLogger(__name__).warning("device=%s: CUDA is not available, evaluating on the CPU", device)
            device = "cpu"
        if device != "cpu":
            model = model.to(device)
            served.engine = Engine(model, think_tokens=served.engine.think_tokens)
        self.served, self.model, self.engine, self.tok = served, model, served.engine, served.tokenizer
        self._device = torch.device(device)
        self.batch_size = max(1, _int("batch_size", batch_size, 32))
        self._max_length = _int("max_length", max_length, model.config.max_position_embeddings)
        self.max_gen_toks = max(1, _int("max_gen_toks", max_gen_toks, 256))
        self.speculative = _int("speculative", speculative, 0)
        self.seed = _int("seed", seed, 0)
        self.stops = list(served.chat_stops)
        self.bos = model.config.bos_token_id

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.stops[0] if self.stops else 0

    @property
    def prefix_token_id(self) -> int:
        return self.bos if self.bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.served.folder).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The text's ids with BOS in front (as every prompt the model was trained on starts), unless
        `add_special_tokens=False` (a continuation)."""
        if add_special_tokens is False:
            return self.tok.encode(string)
        return encode_prompt(self.tok, string, self.bos)

    def chat_template(self, chat_template: bool | str = False) -> str:
        return self.tok.template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = self.tok.render(chat_history, enable_thinking=self.mode.thinking,
                               add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt and text.endswith("<|im_end|>\n"):  # continue the final assistant message
            text = text[: -len("<|im_end|>\n")]
        return text

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None
                              ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding would write it) per request."""
        rows = []  # (input ids, the continuation's ids: the last len(targets) positions of the input predict them)
        for _, ctx, cont in requests:
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[len(whole) - min(len(cont), len(whole) - 1):]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        bs = override_bs or self.batch_size
        for start in range(0, len(order), bs):
            chunk = order[start: start + bs]
            width = len(rows[chunk[0]][0])
            # right-padded with 0: causal attention, so a row's positions never see its padding
            ids = torch.tensor([rows[i][0] + [0] * (width - len(rows[i][0])) for i in chunk], dtype=torch.long,
                               device=self._device)  # (rows, width)
            h = self.model.hidden_states(ids)
            for r, i in enumerate(chunk):
                inp, cont = rows[i]
                n = len(cont)
                targets = torch.tensor(cont, dtype=torch.long, device=self._device)
                logp = self.model.lm_head(h[r, len(inp) - n: len(inp)]).float().log_softmax(-1)
                score = float(logp.gather(-1, targets[:, None]).sum()) if n else 0.0
                greedy = bool((logp.argmax(-1) == targets).all()) if n else True
                out[i] = (score, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each string's whole log-likelihood from BOS, in lm-eval's disjoint windows of `max_length` tokens."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            tokens = self.tok_encode(string, add_special_tokens=False)
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for i, (s, _) in zip(owner, scores):
            totals[i] += s
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _stop_strings(self, until: list[str]) -> list[str]:
        """The stop strings the text must be checked for (a special token among them is a token stop anyway)."""
        specials = {self.tok.decode([t], skip_special_tokens=False) for t in self.stops}
        return [s for s in until if s and s not in specials]

    def _generate_batch(self, contexts: list[str], kwargs: dict) -> list[str]:
        until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
        max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample", False) else 0.0
        top_p = float(kwargs.get("top_p", 1.0) or 1.0) if temperature > 0 else 1.0
        room = max(1, self.max_length - max_gen)
        prompts = [self.tok_encode(c)[-room:] for c in contexts]
        max_gen = min(max_gen, self.engine.max_seq_len - max(map(len, prompts))
                      - (2 * self.speculative + 1 if self.speculative else 0))
        if max_gen < 1:
            raise ValueError("the longest context leaves no room to generate within the model's positions")
        opened = [c.rfind(THINK_START) > c.rfind(THINK_END) for c in contexts]
        stops_text = self._stop_strings(until)
        tokens: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        steps = self.engine.stream(prompts, max_gen, temperature=temperature, top_p=top_p, seed=self.seed,
                                   stop_token_ids=self.stops, num_speculative_tokens=self.speculative,
                                   max_thinking_tokens=self.mode.budget)
        for step in steps:
            for r, t in enumerate(step):
                if t is None or done[r]:
                    continue
                tokens[r].append(t)
                if t in self.stops:
                    done[r] = True
                elif stops_text:
                    part = answer_part(completion_text(self.tok, tokens[r], self.stops), opened[r])
                    done[r] = part is not None and any(s in part for s in stops_text)
            if all(done):
                steps.close()  # every row has its answer: no more decode steps
                break
        out = []
        for r, toks in enumerate(tokens):
            part = answer_part(completion_text(self.tok, toks, self.stops), opened[r])
            out.append(postprocess_generated_text(part or "", until, None))
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) replies, batched by identical generation kwargs, longest context first."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for members in groups.values():
            members.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start: start + self.batch_size]
                kwargs = normalize_gen_kwargs(dict(requests[chunk[0]].args[1]), self.max_gen_toks)
                replies = self._generate_batch([requests[i].args[0] for i in chunk], kwargs)
                for i, reply in zip(chunk, replies):
                    out[i] = reply
                    self.cache_hook.add_partial("generate_until", requests[i].args, reply)
        return out

    def get_model_info(self) -> dict:
        return {"model_name": str(self.served.folder), "think": self.mode.name}


def cli_main(argv: list[str]) -> int:
    """lm-eval's own command line (`lm-eval run ...` or the legacy form without `run`), this backend registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["nemotron3 lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
