"""Synthetic reasoning tasks: determinism, verifiers against references and corruptions, split disjointness."""

from __future__ import annotations

import random
import re

import pytest

from nemotron3 import tasks

FAMILIES = sorted(tasks.FAMILIES)


def test_at_least_five_families():
    assert len(FAMILIES) >= 5


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_deterministic_and_seed_dependent(family):
    a = tasks.generate(family, 30, seed=7)
    assert a == tasks.generate(family, 30, seed=7)
    assert a != tasks.generate(family, 30, seed=8)
    assert tasks.generate(family, 10, seed=7) == a[:10]  # a prefix: corpus size does not reshuffle problems


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_reward_accepts_every_reference_answer(family, difficulty):
    problems = tasks.generate(family, 60, seed=difficulty, difficulty=difficulty)
    fn = tasks.family_reward(family)
    assert fn([p.prompt for p in problems], [p.completion() for p in problems]) == [1.0] * len(problems)
    assert tasks.reward([p.prompt for p in problems], [p.completion() for p in problems]) == [1.0] * len(problems)


def _corrupt(answer: str, rng: random.Random) -> str:
    """Change one digit of the answer (for countdown: one number of the expression)."""
    digits = [i for i, c in enumerate(answer) if c.isdigit()]
    i = rng.choice(digits)
    return answer[:i] + str((int(answer[i]) + rng.randint(1, 9)) % 10) + answer[i + 1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_rejects_corrupted_answers(family):
    rng = random.Random(0)
    problems = tasks.generate(family, 80, seed=3)
    prompts = [p.prompt for p in problems]
    corrupted = [p.completion().replace(f"\n{p.answer}", "\n" + _corrupt(p.answer, rng)) for p in problems]
    scores = tasks.family_reward(family)(prompts, corrupted)
    if family == "countdown":  # a changed number may still reach the target by another route: rare, checked exactly
        for p, c, s in zip(problems, corrupted, scores):
            expr = tasks.extract_answer(c)
            nums = sorted(int(x) for x in re.findall(r"\d+", expr))
            ok = tasks.evaluate_arithmetic(expr) == int(p.prompt.split()[1]) and all(
                nums.count(n) <= p.prompt.split(" with")[0].split()[3:].count(str(n)) for n in nums)
            assert s == float(ok)
        assert sum(scores) <= 0.1 * len(scores)
    else:
        assert scores == [0.0] * len(problems)
    assert tasks.family_reward(family)(prompts, ["" for _ in prompts]) == [0.0] * len(prompts)
    thinking_only = ["<think>\nno idea\n</think>\n" for _ in prompts]
    assert tasks.family_reward(family)(prompts, thinking_only) == [0.0] * len(prompts)


def test_reward_reads_the_answer_after_the_think_block_and_conversational_format():
    p = tasks.generate("add", 1, seed=0)[0]
    assert tasks.reward([p.prompt], [f"<think>\nthe answer is 0\n</think>\n{p.answer}</s>"]) == [1.0]
    assert tasks.reward([p.prompt], [f"Answer: {p.answer}"]) == [1.0]  # reasoning off
    assert tasks.reward([p.prompt], [f"<think>\n{p.answer}\n</think>\nwrong"]) == [0.0]  # a trace is not an answer
    conv_prompt = [{"role": "system", "content": "/think"}, {"role": "user", "content": p.prompt}]
    conv_completion = [{"role": "assistant", "content": p.completion()}]
    assert tasks.reward([conv_prompt], [conv_completion], answer=["ignored"], trainer_state=None) == [1.0]
    assert tasks.reward(["Tell me a joke."], ["42"]) == [0.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        tasks.reward(["a", "b"], ["c"])


def test_countdown_verifier_checks_the_numbers_used():
    p = "Reach 24 using 3 4 8 with + - *."

    def score(ans):
        return tasks.reward([p], [ans])[0]

    assert score("3*8") == 1.0  # a subset of the numbers is allowed
    assert score("(8-4)*3*2") == 0.0  # 2 is not given
    assert score("8*3*1") == 0.0
    assert score("4*4+8") == 0.0  # 4 used twice
    assert score("8*3+0") == 0.0
    assert score("__import__('os')") == 0.0


def test_evaluate_arithmetic_matches_python_on_random_expressions():
    rng = random.Random(1)

    def expr(depth: int) -> str:
        if depth == 0 or rng.random() < 0.3:
            return str(rng.randint(0, 20))
        return f"({expr(depth - 1)}{rng.choice('+-*')}{expr(depth - 1)})" if rng.random() < 0.5 else \
            f"{expr(depth - 1)}{rng.choice('+-*')}{expr(depth - 1)}"

    for _ in range(300):
        e = expr(4)
        assert tasks.evaluate_arithmetic(e) == eval(e), e  # eval on our own generated digits-and-operators
    for bad in ["", "1+", "(1", "1)", "2**3", "a", "1/2", "-1"]:
        assert tasks.evaluate_arithmetic(bad) is None, bad


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_heldout_splits_are_disjoint(family):
    fam = tasks.FAMILIES[family]
    train = tasks.generate(family, 1500, seed=0, split="train")
    heldout = tasks.generate(family, 40, seed=0, split="heldout")
    train_keys = {fam.key(fam.parse(p.prompt)) for p in train}
    heldout_keys = {fam.key(fam.parse(p.prompt)) for p in heldout}
    assert not train_keys & heldout_keys
    assert all(tasks.split_of(k) == "train" for k in train_keys)
    assert all(tasks.split_of(k) == "heldout" for k in heldout_keys)
    assert len(heldout_keys) == len(heldout)  # an evaluation set counts each problem once
    # held out ≈ 10% of the key space: a statistical check over many raw keys
    share = sum(tasks.split_of(f"{family}:{i}") == "heldout" for i in range(20000)) / 20000
    assert abs(share - tasks.HELDOUT_PER_MILLE / 1000) < 0.01


def test_commutative_problems_share_a_key():
    add, mul = tasks.FAMILIES["add"], tasks.FAMILIES["mul"]
    assert add.key((12, "+", 34)) == add.key((34, "+", 12))
    assert add.key((34, "-", 12)) != add.key((12, "-", 34))
    assert mul.key((12, 3)) == mul.key((3, 12))


def test_difficulty_grows_the_problems():
    for family in FAMILIES:
        short = sum(len(p.text()) for p in tasks.generate(family, 100, difficulty=1))
        long = sum(len(p.text()) for p in tasks.generate(family, 100, difficulty=3))
        assert long > 1.2 * short, family


def test_traces_spell_out_the_steps():
    p = tasks.FAMILIES["add"].problem((478, "+", 356))
    assert p.trace.splitlines() == ["8+6+0=14 -> 4, carry 1", "7+5+1=13 -> 34, carry 1", "4+3+1=8 -> 834, carry 0"]
    assert p.answer == "834"
    p = tasks.FAMILIES["add"].problem((503, "-", 78))
    assert p.answer == "425" and "13-8-0=5 -> 5, borrow 1" in p.trace
    p = tasks.FAMILIES["mul"].problem((47, 36))
    assert p.answer == str(47 * 36) and p.trace.splitlines()[-1] == "282+1410=1692"
    p = tasks.FAMILIES["modpow"].problem((3, 4, 7))
    assert p.answer == str(pow(3, 4, 7))
    assert p.trace.splitlines() == ["3^1=3", "3^2=3*3=9=2", "3^3=2*3=6", "3^4=6*3=18=4"]
    p = tasks.FAMILIES["sort"].problem((5, 3, 9))
    assert p.answer == "3 5 9"


def test_every_family_roundtrips_its_prompt():
    for family in FAMILIES:
        fam = tasks.FAMILIES[family]
        for p in tasks.generate(family, 50, seed=11, difficulty=2):
            found = tasks.family_of(p.prompt)
            assert found is not None and found[0] is fam
            if family != "countdown":  # its parsed prompt no longer holds the construction (any route is valid)
                assert fam.problem(found[1]).answer == p.answer


def test_mixture_is_balanced():
    probs = tasks.mixture(600, seed=0)
    counts = {f: sum(p.family == f for p in probs) for f in tasks.default_families()}  # retrieval only when named
    assert set(counts.values()) == {100}
    assert [p.family for p in probs[:12]] != sorted(p.family for p in probs[:12])  # interleaved
