"""Multi-turn rollouts: episodes of environments (nemotron3/envs) sampled through the engine's scheduler.

    batch = multiturn_rollout(engine, tokenizer, items, num_generations=8, params=params, max_completion_length=256)
    scores = score_episodes(batch)                        # rewards (N,), accuracy (N,), per-environment values
    metrics = episode_metrics(batch, scores)              # env/<name>/reward, tool_calls/valid_fraction, ...

`items` are (environment, example) pairs (envs/mix.py `EnvMix.batch`); each is repeated `num_generations` times,
the repeats next to each other (GRPO's groups). Every episode runs turn by turn (docs/agentic-rl.md §4):

1. Its prompt is `<s>` + the example rendered with the environment's tools and the generation prompt.
2. The model's turn is sampled by the engine's continuous-batching scheduler (engine/scheduler.py) until
   `<|im_end|>`, `</s>`, or, in an environment with tools, `</tool_call>` (the tool-call closing tag), or until the
   turn's token budget: `params.max_tokens`, and what is left of the episode's `max_completion_length`.
3. `env.step` records the turn and answers: tool results (or the documented error messages), a user turn, or done.
4. The environment's turn is appended as text the template would write there: the closing `<|im_end|>\\n` (after
   `</tool_call>`; after a generated `<|im_end|>` only `\\n`), the reply turns, and the generation prompt, tokenized
   and put after the tokens so far. An episode whose next turn would not fit its budget ends (`length`).
5. The next turn is a new request of the whole conversation: it is prefilled again (the scheduler does not expose
   continuing a finished request's cache), while the other episodes keep decoding.

Output per episode: `completion_ids` (everything after the prompt: the model's tokens as sampled, the environment's
as tokenized), `completion_mask` (1 exactly on the model's tokens), `logprobs` (the engine's log-probability of each
model token under the sampling law, 0 on the environment's), so the trainer's full forward of prompt + completion
recomputes every turn's tokens and `token_mult_prob_error` covers them all. Turns, stop reasons, tool-call counts.

Sampling: turn t of episode i draws from stream `t·N + i` of the call's seed (N episodes), so an episode's draws do
not depend on when its turns run, and a single-turn environment draws the very samples of rl/rollout.py
(row i, stream i). Greedy speculative decoding (`num_speculative_tokens` k > 0) gives the tokens of plain greedy.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field, replace

import torch

from nemotron3.engine import Engine, SamplingParams
from nemotron3.engine.params import speculative_config
from nemotron3.engine.requests import Event, Request
from nemotron3.engine.sampling import fresh_seed
from nemotron3.engine.scheduler import Scheduler
from nemotron3.envs.base import Environment, Example, State
from nemotron3.envs.mix import env_metrics
from nemotron3.rl import rewards
from nemotron3.tokenizer import Tokenizer


@dataclass
class EpisodeBatch:
    envs: list[Environment]  # each episode's environment
    examples: list[Example]
    prompt_ids: list[list[int]]  # <s> + the rendered prompt with its generation prompt
    completion_ids: list[list[int]]  # every token after the prompt: the model's turns and the environment's
    completion_mask: list[list[int]]  # 1 on the tokens the model sampled, 0 on the environment's
    logprobs: list[list[float]]  # the engine's log-probability of each completion token (0.0 where the mask is 0)
    messages: list[list[dict]]  # the completion as messages: assistant turns (raw text) and the replies
    texts: list[str]  # the last assistant turn's text (single-turn: rl/rollout.py's texts)
    truncated: list[bool]  # ended by a token budget (stop reason "length")
    turns: list[int]
    stop_reasons: list[str]
    counts: list[collections.Counter]  # tool calls: valid, invalid, each error kind
    stats: dict = field(default_factory=dict)

    @property
    def env_names(self) -> list[str]:
        return [e.name for e in self.envs]

    def mask_tensor(self, rows: list[int], width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(len(rows), width) float: `completion_mask` of those rows, right-padded with 0 (the trainer's layout)."""
        out = torch.zeros(len(rows), width, device=device)
        for j, i in enumerate(rows):
            m = self.completion_mask[i][:width]
            out[j, : len(m)] = torch.tensor(m, dtype=torch.float32, device=device)
        return out


@dataclass
class _Episode:
    env: Environment
    state: State
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    text: str = ""


def prompt_ids(tokenizer: Tokenizer, env: Environment, example: Example, enable_thinking: bool = True) -> list[int]:
    """`<s>` + the example rendered with the environment's tools and the generation prompt (the tokenizer's
    template: ours, or a checkpoint folder's)."""
    text = tokenizer.render(example.messages, env.tool_defs, enable_thinking=enable_thinking,
                            add_generation_prompt=True)
    return tokenizer.encode_prompt(text, tokenizer.bos_id)


_CALL = [{"role": "user", "content": "q"},
         {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"a": 1}}]}]


def reply_text(tokenizer: Tokenizer, replies: list[dict], ending: str, enable_thinking: bool = True) -> str:
    """The text between the model's turn and its next one, as the template writes it: what closes the turn after
    `</tool_call>` (ours: `<|im_end|>\n`) or after the end-of-turn marker (`\n`), the replies, the generation
    prompt. Read off renderings of a fixed conversation (a user turn and a tool-calling assistant turn), with and
    without the replies, so it holds for any template that renders conversations prefix by prefix."""
    before = tokenizer.render(_CALL, enable_thinking=enable_thinking)
    after = tokenizer.render(_CALL + replies, enable_thinking=enable_thinking, add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("the chat template does not render a conversation prefix by prefix: multi-turn rollouts "
                         "need one that does")
    marker = "</tool_call>" if ending == "tool_call" else tokenizer.format.end_of_turn
    return before.rsplit(marker, 1)[-1] + after[len(before):]


def multiturn_rollout(engine: Engine, tokenizer: Tokenizer, items: list[tuple[Environment, Example]],
                      num_generations: int, params: SamplingParams, max_completion_length: int,
                      enable_thinking: bool = True) -> EpisodeBatch:
    """Episodes of every (environment, example), `num_generations` each (module docstring)."""
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    eos, end, call_end = tokenizer.eos_id, tokenizer.end_of_turn_id, tokenizer.token_to_id("</tool_call>")
    endings = {eos: "eos", end: "end_of_turn", call_end: "tool_call"}
    turn_stops = tuple(t for t in (eos, end) if t is not None)
    spec = speculative_config(engine.model, params.num_speculative_tokens)
    seed = params.seed if params.seed is not None or params.greedy else fresh_seed()
    eps = []
    for env, ex in items:
        ids = prompt_ids(tokenizer, env, ex, enable_thinking)
        eps += [_Episode(env, env.init_state(ex), ids) for _ in range(num_generations)]
    n = len(eps)
    longest = max(len(e.prompt) for e in eps)
    capacity = longest + max_completion_length + spec.room
    if capacity > engine.max_seq_len:
        i = max(range(n), key=lambda j: len(eps[j].prompt))
        raise ValueError(f"episode {i} ({eps[i].env.name}): its prompt of {longest} tokens plus max_completion_length "
                         f"{max_completion_length} does not fit the engine's max_seq_len {engine.max_seq_len}")
    sched = Scheduler(engine.model, rows=n, max_seq_len=capacity, token_budget=None,
                      prefill_chunk=engine.prefill_chunk, num_speculative_tokens=spec.k,
                      think_tokens=engine.think_tokens, fast=engine.fast if engine.fast is not None else False)
    base = replace(params, logprobs=0, logprobs_mode="sampled", n=1, seed=seed, num_speculative_tokens=spec.k)
    finished: list[int] = []

    def request(i: int) -> tuple[Request, object]:
        e = eps[i]
        stops = turn_stops + ((call_end,) if e.env.tool_defs and call_end is not None else ())
        left = max_completion_length - len(e.ids)
        p = replace(base, max_tokens=min(params.max_tokens or left, left), stop_token_ids=stops)

        def on_event(ev: Event) -> None:
            e.events.append(ev)
            if ev.finish is not None:
                finished.append(i)
        return Request(e.prompt + e.ids, p, stream_index=e.state.turns * n + i), on_event

    t0 = time.perf_counter()
    sched.submit_group([request(i) for i in range(n)])
    generated = 0
    while not sched.idle():
        sched.step()
        done, finished[:] = sorted(finished), []
        for i in done:
            e = eps[i]
            toks = [t for ev in e.events for t in ev.tokens]
            lps = [x for ev in e.events for x in (ev.logprobs or [])]
            finish = e.events[-1].finish
            e.events = []
            if finish not in ("stop", "length"):
                raise RuntimeError(f"episode {i} ({e.env.name}): the engine ended its turn with {finish!r}")
            generated += len(toks)
            ending = endings[toks[-1]] if finish == "stop" else "length"
            e.text = tokenizer.decode(toks[:-1] if ending in ("eos", "end_of_turn") else toks)
            e.ids += toks
            e.mask += [1] * len(toks)
            e.logprobs += lps
            replies = e.env.step(e.state, e.text, ending)
            if e.state.done:
                continue
            tail = tokenizer.encode(reply_text(tokenizer, replies, ending, enable_thinking))
            if len(e.ids) + len(tail) >= max_completion_length:  # no room for one more model token
                e.state.done, e.state.stop_reason = True, "length"
                continue
            e.ids += tail
            e.mask += [0] * len(tail)
            e.logprobs += [0.0] * len(tail)
            sched.submit(*request(i))
    seconds = time.perf_counter() - t0
    stats = {"tokens": generated, "seconds": seconds, "tok_s": generated / seconds if seconds > 0 else 0.0,
             "turns": sum(e.state.turns for e in eps) / n, **sched.speculation_stats()}
    return EpisodeBatch([e.env for e in eps], [e.state.example for e in eps], [e.prompt for e in eps],
                        [e.ids for e in eps], [e.mask for e in eps], [e.logprobs for e in eps],
                        [e.state.completion for e in eps], [e.text for e in eps],
                        [e.state.stop_reason == "length" for e in eps], [e.state.turns for e in eps],
                        [e.state.stop_reason for e in eps], [e.state.counts for e in eps], stats)


@dataclass
class EpisodeScores:
    rewards: torch.Tensor  # (N,) float64: each environment's rubric, Σ w_f r_f (NaN: every function said None)
    accuracy: torch.Tensor  # (N,) float64: the environment's accuracy function (NaN where it has none)
    per_env: dict[str, tuple[list[int], list[str], torch.Tensor]]  # name -> (episodes, function names, values)


def score_episodes(batch: EpisodeBatch) -> EpisodeScores:
    """Each episode scored by its environment's rubric through rl/rewards.py (TRL's signature, checked; a
    misbehaving function is a RewardError naming it). Prompts are the examples' messages, completions the episodes'
    messages, columns the examples' columns plus `completion_ids`."""
    n = len(batch.completion_ids)
    total = torch.full((n,), math.nan, dtype=torch.float64, device="cpu")  # host: rewards are Python numbers
    accuracy = torch.full((n,), math.nan, dtype=torch.float64, device="cpu")
    per_env = {}
    for env in dict.fromkeys(batch.envs):
        name = env.name
        idx = [i for i, x in enumerate(batch.envs) if x is env]
        prompts = [batch.examples[i].messages for i in idx]
        completions = [batch.messages[i] for i in idx]
        keys = sorted({k for i in idx for k in batch.examples[i].columns})
        columns = {k: [batch.examples[i].columns.get(k) for i in idx] for k in keys}
        columns["completion_ids"] = [batch.completion_ids[i] for i in idx]
        r, per = rewards.score(env.rubric.funcs, env.rubric.weights, prompts, completions, columns)
        total[idx] = r
        per_env[name] = (idx, env.rubric.names, per)
        if env.rubric.accuracy is not None:
            accuracy[idx], _ = rewards.score([env.rubric.accuracy], [1.0], prompts, completions, columns)
    return EpisodeScores(total, accuracy, per_env)


def episode_metrics(batch: EpisodeBatch, scores: EpisodeScores) -> dict[str, float]:
    """envs/mix.py `env_metrics` of a scored batch (env/<name>/reward, accuracy, turns; tool-call validity)."""
    return env_metrics(batch.env_names, scores.rewards.tolist(), scores.accuracy.tolist(), batch.turns, batch.counts)
