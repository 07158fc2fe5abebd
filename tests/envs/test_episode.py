"""Episodes turn by turn (envs/base.py, envs/tool_env.py) with a scripted policy, against hand-written turns:
tool calls and their results, every kind of tool error as its documented message (the episode goes on), the
final answer and its reward, max_turns, and the endings that stop an episode."""

from __future__ import annotations

import time

from nemotron3.envs import Example, LookupEnv, Rubric, TaskEnv, ToolEnv, run_episode
from nemotron3.envs.lookup import answer_reward


def call(tool: str, **params) -> str:
    """A tool call written the way the model writes it (docs/post-training.md §1)."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={tool}>\n{body}</function>\n</tool_call>"


def script(turns: list[tuple[str, str]]):
    """A policy that plays `turns` in order and records the conversation it was shown each time."""
    seen = []

    def policy(messages):
        seen.append([dict(m) for m in messages])
        return turns[len(seen) - 1]
    policy.seen = seen
    return policy


EXAMPLE = Example([{"role": "user", "content": "Compute p4 * t9. Each name ..."}],
                  {"answer": "84", "facts": {"p4": 12, "t9": 7, "x2": 3}, "expression": "p4 * t9"})


def test_lookup_episode_against_hand_written_turns():
    env = LookupEnv(max_turns=8)
    turns = [
        ("I need p4 and t9.\n</think>\n" + call("lookup", key="p4"), "tool_call"),
        ("p4 = 12\n</think>\n" + call("search", query="t9"), "tool_call"),  # unknown tool
        ("</think>\n" + call("lookup", name="t9"), "tool_call"),  # bad argument name
        ("</think>\n<tool_call>\n<function=lookup>\nnot json\n</function>\n</tool_call>", "tool_call"),  # malformed
        ("</think>\n" + call("lookup", key="zz"), "tool_call"),  # the tool raises: no such key
        ("</think>\n" + call("lookup", key="t9"), "tool_call"),
        ("t9 = 7\n</think>\n" + call("calculate", expression="12 * 7"), "tool_call"),
        ("12 * 7 = 84\n</think>\n84", "end_of_turn"),
    ]
    policy = script(turns)
    state = run_episode(env, EXAMPLE, policy)
    tool_replies = [m["content"] for m in state.completion if m["role"] == "tool"]
    assert tool_replies == [
        "12",
        "error: unknown tool 'search'; the tools are lookup, calculate",
        "error: bad arguments for lookup: missing a required argument: 'key'",
        "error: malformed tool call (function lookup: expected <parameter=KEY>...</parameter> elements or a JSON "
        "object, got 'not json')",
        "error: lookup raised KeyError: \"no number is stored under 'zz'\"",
        "7",
        "84",
    ]
    roles = [m["role"] for m in state.completion]
    assert roles == ["assistant", "tool"] * 7 + ["assistant"]
    assert [m["content"] for m in state.completion if m["role"] == "assistant"] == [t for t, _ in turns]
    assert state.done and state.stop_reason == "completed" and state.turns == 8
    assert dict(state.counts) == {"valid": 4, "invalid": 3, "unknown_tool": 1, "bad_arguments": 1, "malformed": 1,
                                  "exception": 1}
    # the valid calls are parsed onto their turns, for a rubric to read; an invalid turn has none
    assert state.completion[0]["tool_calls"] == [{"name": "lookup", "arguments": {"key": "p4"}}]
    assert "tool_calls" not in state.completion[2]
    # the policy saw each reply before its next turn
    assert policy.seen[1][-1] == {"role": "tool", "content": "12"}
    assert answer_reward([EXAMPLE.messages], [state.completion], answer=["84"]) == [1.0]
    assert answer_reward([EXAMPLE.messages], [state.completion], answer=["85"]) == [0.0]


def test_max_turns_ends_the_episode_and_the_last_call_is_not_run():
    env = LookupEnv(max_turns=3)
    policy = script([("</think>\n" + call("lookup", key="p4"), "tool_call")] * 5)
    state = run_episode(env, EXAMPLE, policy)
    assert state.turns == 3 and state.stop_reason == "max_turns"
    assert [m["role"] for m in state.completion] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert state.counts["valid"] == 2  # the third turn's call was neither run nor counted
    assert answer_reward([EXAMPLE.messages], [state.completion], answer=["12"]) == [0.0]  # still calling


def test_endings_eos_and_length_stop_at_once():
    for ending in ("eos", "length"):
        state = run_episode(LookupEnv(), EXAMPLE, script([("</think>\n" + call("lookup", key="p4"), ending)]))
        assert (state.turns, state.stop_reason, len(state.completion)) == (1, ending, 1)
        assert not state.counts


def test_failing_tools_become_messages_and_the_episode_goes_on():
    def slow(x: int) -> str:
        """Sleeps.

        Args:
            x: seconds
        """
        time.sleep(x)
        return "woke"

    def broken(x: int) -> str:
        """Raises.

        Args:
            x: anything
        """
        raise RuntimeError("disk on fire")

    def count(x: int):
        """Returns an int.

        Args:
            x: anything
        """
        return x

    env = ToolEnv([slow, broken, count], Rubric(), max_turns=6, timeout=0.05)
    turns = [("</think>\n" + call("slow", x=2), "tool_call"), ("</think>\n" + call("broken", x=1), "tool_call"),
             ("</think>\n" + call("count", x=3), "tool_call"), ("</think>\n" + call("slow", x="soon"), "tool_call"),
             ("</think>\n" + call("slow", x=0), "tool_call"), ("done", "end_of_turn")]
    state = run_episode(env, Example([{"role": "user", "content": "go"}]), script(turns))
    assert [m["content"] for m in state.completion if m["role"] == "tool"] == [
        "error: slow did not finish within 0.05 s",
        "error: broken raised RuntimeError: disk on fire",
        "error: count returned int, not a string",
        "error: bad arguments for slow: argument 'x' must be integer, got string \"soon\"",
        "woke",
    ]
    assert state.stop_reason == "completed" and state.turns == 6
    assert dict(state.counts) == {"valid": 4, "invalid": 1, "timeout": 1, "exception": 1, "non_string": 1,
                                  "bad_arguments": 1}


def test_a_turn_ended_by_im_end_with_a_broken_call_is_a_malformed_call():
    state = run_episode(LookupEnv(max_turns=2), EXAMPLE,
                        script([("</think>\n<tool_call>\n<function=lookup>", "end_of_turn"), ("12", "end_of_turn")]))
    assert state.completion[1]["content"].startswith("error: malformed tool call (unbalanced <tool_call>")
    assert state.counts["malformed"] == 1 and state.stop_reason == "completed"


def test_task_env_is_single_turn():
    env = TaskEnv(["add"])
    ex = env.get_dataset(1, seed=0)[0]
    state = run_episode(env, ex, script([("x</think>\n" + call("lookup", key="p4"), "tool_call")]))
    assert (state.turns, state.stop_reason) == (1, "completed") and env.tool_defs is None
