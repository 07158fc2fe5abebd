"""The task families as environments (rewards unchanged: the same numbers as rl/rewards.py with `tasks` on the
same completions), the lookup environment's problems (verifiable, disjoint splits, at least two lookups), its SFT
conversations (replayed as an episode, every reply is the environment's own), and the verifiers adapter."""

from __future__ import annotations

import random
import sys
import types

import pytest
import torch

from nemotron3 import tasks
from nemotron3.envs import LookupEnv, TaskEnv, load_environment, run_episode
from nemotron3.envs.lookup import conversations, problems, prompt_text, substitute
from nemotron3.rl import rewards
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import data as train_data
from nemotron3.train import sft_data


def _completions(examples, rng):
    """Per example: a right completion, a wrong one, and a garbled one (as single-turn RL's texts are written)."""
    out = []
    for ex in examples:
        out += [f"steps\n</think>\n{ex.columns['answer']}", f"</think>\n{ex.columns['answer']}1",
                rng.choice(["", "</think>", "42"])]
    return out


@pytest.mark.parametrize("families", [None, *[[f] for f in sorted(tasks.default_families())]],
                         ids=lambda f: "tasks" if f is None else f[0])
def test_task_env_rewards_unchanged(families):
    env = TaskEnv(families)
    examples = env.get_dataset(12, seed=1)
    texts = _completions(examples, random.Random(0))
    prompts = [ex.messages for ex in examples for _ in range(3)]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    columns = {k: [ex.columns[k] for ex in examples for _ in range(3)] for k in ("family", "answer")}
    want, _ = rewards.score([rewards.load("tasks")], [1.0], prompts, completions, columns)
    got, _ = rewards.score(env.rubric.funcs, env.rubric.weights, prompts, completions, columns)
    assert torch.equal(got, want) and want.sum() >= len(examples)  # every reference scores 1
    acc, _ = rewards.score([env.rubric.accuracy], [1.0], prompts, completions, columns)
    assert torch.equal(acc, want)
    if families:
        fam, _ = rewards.score([tasks.family_reward(families[0])], [1.0], prompts, completions, columns)
        assert torch.equal(fam, want)


def test_lookup_problems():
    ps = problems(300, seed=0, difficulty=2)
    assert ps == problems(300, seed=0, difficulty=2)
    for p in ps:
        assert len(p["names"]) == 3 and set(p["names"]) < set(p["facts"])
        assert p["answer"] == eval(substitute(p["expression"], p["facts"]))  # trusted test data: Python's own eval
        assert not any(w.strip(".").isdigit() for w in prompt_text(p["expression"]).split())  # no value is given
    train = {(p["expression"], tuple(p["facts"][n] for n in p["names"])) for p in problems(2000, seed=1)}
    held = problems(200, seed=1, split="heldout")
    keys = [(p["expression"], tuple(p["facts"][n] for n in p["names"])) for p in held]
    assert not train & set(keys) and len(set(keys)) == len(keys)


def test_sft_conversation_replays_as_an_episode():
    env = LookupEnv(difficulty=2)
    for conv, ex in zip(conversations(5, seed=3, difficulty=2), env.get_dataset(5, seed=3)):
        msgs = conv["messages"]
        assert msgs[0] == ex.messages[0] and conv["tools"] == env.tool_defs
        turns = [m for m in msgs if m["role"] == "assistant"]
        assert len(turns) == 5  # three lookups, a calculation, the answer

        def policy(seen, turns=turns):
            m = turns[sum(x["role"] == "assistant" for x in seen)]
            text = f"{m['reasoning_content']}\n</think>\n"  # what the model writes after <think>\n
            calls = m.get("tool_calls")
            if calls:
                fn = calls[0]["function"]
                body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in fn["arguments"].items())
                return f"{text}<tool_call>\n<function={fn['name']}>\n{body}</function>\n</tool_call>", "tool_call"
            return text + m["content"], "end_of_turn"

        state = run_episode(env, ex, policy)
        assert [m["content"] for m in state.completion if m["role"] == "tool"] == \
            [m["content"] for m in msgs if m["role"] == "tool"]
        assert state.counts == {"valid": 4} and state.stop_reason == "completed"
        assert env.rubric.funcs[0]([ex.messages], [state.completion], answer=[ex.columns["answer"]]) == [1.0]


def test_sft_rows_of_tool_conversations():
    tok = Tokenizer.train(train_data.task_texts(100, seed=0), vocab_size=300)
    convs = sft_data.tool_conversations(3, seed=0)
    ex = sft_data.encode(convs[0], tok)
    text = tok.decode(ex.ids[1:])
    assert text == tok.render(convs[0].messages, convs[0].tools)
    trained = tok.decode([t for t, m in zip(ex.ids, ex.mask) if m])
    assert trained.count("<tool_call>") == 3 and "<tool_response>" not in trained and trained.endswith("<|im_end|>")
    off = sft_data.encode(convs[0], tok, "off")
    assert "<think></think>" in tok.decode(off.ids) and "I need" not in tok.decode(off.ids)


def test_verifiers_adapter_with_a_stand_in_package(monkeypatch):
    class Rubric:
        def __init__(self):
            async def correct(completion, answer):  # async, asks for two objects
                return float(completion[-1]["content"].strip() == answer)

            def longest(completions, answers):  # a group function
                n = [len(c[-1]["content"]) for c in completions]
                return [float(x == max(n)) for x in n]
            self.funcs, self.weights, self.parser = [correct, longest], [1.0, 0.5], None

    class Env:
        max_turns = 1
        rubric = Rubric()

        def get_dataset(self, n, seed):
            return [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i), "info": {}, "task": "t"}
                    for i in range(n)]
        get_eval_dataset = get_dataset

    fake = types.ModuleType("verifiers")
    fake.load_environment = lambda env_id, **kw: Env()
    monkeypatch.setitem(sys.modules, "verifiers", fake)
    env = load_environment("verifiers:toy")
    exs = env.get_dataset(2, seed=0)
    assert env.name == "verifiers:toy" and exs[1].messages == [{"role": "user", "content": "q1"}]
    comps = [[{"role": "assistant", "content": "0"}], [{"role": "assistant", "content": "10"}]]
    columns = {k: [ex.columns[k] for ex in exs] for k in ("answer", "info", "task")}
    total, per = rewards.score(env.rubric.funcs, env.rubric.weights, [e.messages for e in exs], comps, columns)
    assert per.tolist() == [[1.0, 0.0], [0.0, 1.0]] and total.tolist() == [1.0, 0.5]
    Env.max_turns = 3
    with pytest.raises(ValueError, match="max_turns=3: only single-turn"):
        load_environment("verifiers:toy")
    monkeypatch.setitem(sys.modules, "verifiers", None)
    with pytest.raises(ValueError, match="verifiers package is not installed"):
        load_environment("verifiers:toy")
