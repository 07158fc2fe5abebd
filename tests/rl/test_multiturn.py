"""Multi-turn rollouts through the engine (rl/multiturn.py): the token row and loss mask of a scripted episode
against one built by hand; a single-turn environment gives rl/rollout.py's very samples; on a tiny model, greedy
multi-turn episodes are the same with MTP speculation as without, and the engine's log-probabilities of every
model turn are what the trainer's full forward recomputes (token_mult_prob_error covers every turn)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_mtp_model

import nemotron3
from nemotron3.engine import SamplingParams
from nemotron3.engine.requests import Event
from nemotron3.envs import Example, LookupEnv, TaskEnv
from nemotron3.rl import multiturn
from nemotron3.rl.loss import completion_logprobs
from nemotron3.rl.rollout import rollout
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import data as train_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(train_data.task_texts(200, seed=0), vocab_size=300)


EXAMPLE = Example([{"role": "user", "content": "Compute p4 * t9."}],
                  {"answer": "84", "facts": {"p4": 12, "t9": 7}, "expression": "p4 * t9"})
CALL = "<tool_call>\n<function=lookup>\n<parameter=key>\n{}\n</parameter>\n</function>\n</tool_call>"
TURNS = ["p4 first\n</think>\n" + CALL.format("p4"), "then t9\n</think>\n" + CALL.format("zz"),
         "oops\n</think>\n" + CALL.format("t9"), "12*7=84\n</think>\n84<|im_end|>"]


class ScriptedScheduler:
    """Stands in for the engine's scheduler: turn t of an episode emits TURNS[t] (cut at its stop ids), with
    log-probability -(t + 1) per token, and records the requests it was given."""

    requests: list = []

    def __init__(self, model, rows, max_seq_len, token_budget, prefill_chunk, num_speculative_tokens, think_tokens,
                 fast):
        self.queue = []

    def submit_group(self, items):
        for item in items:
            self.submit(*item)

    def submit(self, req, on_event):
        ScriptedScheduler.requests.append(req)
        self.queue.append((req, on_event))

    def idle(self):
        return not self.queue

    def step(self):
        queue, self.queue = self.queue, []
        for req, on_event in queue:
            turn = req.stream_index  # one episode: stream t·N + i = t
            ids = self.tok.encode(TURNS[turn])
            for j, t in enumerate(ids):
                if t in req.params.stop_token_ids:
                    ids = ids[: j + 1]
                    break
            ids = ids[: req.params.max_tokens]
            finish = "stop" if ids[-1] in req.params.stop_token_ids else "length"
            on_event(Event(ids, logprobs=[-(turn + 1.0)] * len(ids), finish=finish))

    def speculation_stats(self):
        return {}


def test_scripted_episode_row_and_loss_mask_by_hand(tok, monkeypatch):
    ScriptedScheduler.tok, ScriptedScheduler.requests = tok, []
    monkeypatch.setattr(multiturn, "Scheduler", ScriptedScheduler)
    engine = SimpleNamespace(model=None, max_seq_len=4096, prefill_chunk=64, think_tokens=None, fast=None)
    env = LookupEnv(max_turns=6)
    batch = multiturn.multiturn_rollout(engine, tok, [(env, EXAMPLE)], 1, SamplingParams(num_speculative_tokens=0),
                                        max_completion_length=1000)
    # the row, built by hand: prompt, then model turns (mask 1) and the environment's text (mask 0)
    prompt = "<|im_start|>system\n" + tok.render([], env.tool_defs)[len("<|im_start|>system\n"):] + \
        "<|im_start|>user\nCompute p4 * t9.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert batch.prompt_ids[0] == [tok.bos_id, *tok.encode(prompt)]

    def env_text(reply):
        return ("<|im_end|>\n<|im_start|>tool\n<tool_response>\n" + reply +
                "\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n")
    pieces = [(TURNS[0], 1, -1.0), (env_text("12"), 0, 0.0), (TURNS[1], 1, -2.0),
              (env_text("error: lookup raised KeyError: \"no number is stored under 'zz'\""), 0, 0.0),
              (TURNS[2], 1, -3.0), (env_text("7"), 0, 0.0), (TURNS[3], 1, -4.0)]
    ids, mask, lps = [], [], []
    for text, m, lp in pieces:
        piece = tok.encode(text)
        ids, mask, lps = ids + piece, mask + [m] * len(piece), lps + [lp] * len(piece)
    assert batch.completion_ids[0] == ids and batch.completion_mask[0] == mask and batch.logprobs[0] == lps
    # the row's text is the template's rendering of the whole conversation
    whole = tok.render(EXAMPLE.messages + [
        {"role": "assistant", "content": "", "reasoning_content": "p4 first", "tool_calls": [
            {"name": "lookup", "arguments": {"key": "p4"}}]}, {"role": "tool", "content": "12"}], env.tool_defs)
    assert tok.decode(batch.prompt_ids[0][1:] + batch.completion_ids[0]).startswith(whole)
    assert batch.turns == [4] and batch.stop_reasons == ["completed"] and batch.texts == ["12*7=84\n</think>\n84"]
    assert batch.counts[0] == {"valid": 3, "exception": 1}
    # each turn is the whole conversation so far, one stream per turn, stopping at </tool_call> too
    reqs = ScriptedScheduler.requests
    assert [r.stream_index for r in reqs] == [0, 1, 2, 3]
    assert reqs[2].prompt == batch.prompt_ids[0] + ids[: len(reqs[2].prompt) - len(batch.prompt_ids[0])]
    assert tok.token_to_id("</tool_call>") in reqs[0].params.stop_token_ids
    assert batch.mask_tensor([0], len(ids) + 2).tolist()[0] == [float(m) for m in mask] + [0.0, 0.0]
    scores = multiturn.score_episodes(batch)
    assert scores.rewards.tolist() == [1.0] and scores.accuracy.tolist() == [1.0]
    assert multiturn.episode_metrics(batch, scores)["tool_calls/valid_fraction"] == 1.0
    # the budget: an episode whose next turn does not fit ends with "length"
    short = multiturn.multiturn_rollout(engine, tok, [(env, EXAMPLE)], 1, SamplingParams(num_speculative_tokens=0),
                                        max_completion_length=len(tok.encode(TURNS[0])) + 5)
    assert short.stop_reasons == ["length"] and short.truncated == [True] and short.turns == [1]


def test_single_turn_env_gives_rollouts_samples(tok):
    model = tiny_mtp_model(tok.vocab_size)
    engine = nemotron3.Engine(model)
    env = TaskEnv()
    items = [(env, ex) for ex in env.get_dataset(2, seed=0)]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, num_speculative_tokens=0)
    batch = multiturn.multiturn_rollout(engine, tok, items, 3, params, max_completion_length=10)
    want = rollout(engine, tok, [multiturn.prompt_ids(tok, env, ex) for _, ex in items], 3, params)
    assert batch.prompt_ids == want.prompt_ids and batch.completion_ids == want.completion_ids
    assert batch.texts == want.texts and batch.truncated == want.truncated
    assert torch.allclose(torch.tensor(sum(batch.logprobs, [])), torch.tensor(sum(want.logprobs, [])), atol=1e-5)
    assert all(m == [1] * len(c) for m, c in zip(batch.completion_mask, batch.completion_ids))


def test_multiturn_greedy_speculation_and_logprobs_every_turn(tok):
    model = tiny_mtp_model(tok.vocab_size)
    env = LookupEnv()
    items = [(env, ex) for ex in env.get_dataset(2, seed=0)]
    call_end = tok.token_to_id("</tool_call>")
    with torch.no_grad():  # make the random model close "tool calls" now and then, so episodes have several turns
        probe = multiturn.multiturn_rollout(nemotron3.Engine(model), tok, items, 1,
                                            SamplingParams(max_tokens=16, num_speculative_tokens=0), 200)
        common = torch.tensor(sum(probe.completion_ids, [])).bincount().argmax()
        model.lm_head.weight[call_end] = 1.05 * model.lm_head.weight[common]
    engine = nemotron3.Engine(model)
    runs = [multiturn.multiturn_rollout(engine, tok, items, 2, SamplingParams(max_tokens=16, num_speculative_tokens=k),
                                        max_completion_length=260) for k in (0, 3)]
    plain, spec = runs
    assert spec.completion_ids == plain.completion_ids and spec.completion_mask == plain.completion_mask
    assert max(plain.turns) >= 3 and spec.stats["acceptance_length"] >= 1.0
    assert sum(c["malformed"] for c in plain.counts) >= 4  # the random model's calls are all malformed
    for batch in runs:
        with torch.no_grad():
            want, _, valid = completion_logprobs(model, batch.prompt_ids, batch.completion_ids, 1.0)
        mask = batch.mask_tensor(range(len(batch.prompt_ids)), want.shape[1]) * valid
        got = torch.zeros_like(want)
        for i, lp in enumerate(batch.logprobs):
            got[i, : len(lp)] = torch.tensor(lp)
        assert mask.sum() > 0 and torch.allclose(got * mask, want * mask, atol=2e-4)
        err = float((torch.exp((got - want).abs()) * mask).sum() / mask.sum())  # token_mult_prob_error
        assert abs(err - 1.0) < 1e-3
