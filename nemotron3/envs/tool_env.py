"""ToolEnv: a multi-turn environment whose replies are the results of the model's tool calls.

    env = ToolEnv(tools=[lookup, calculate], max_turns=6, timeout=2.0, rubric=Rubric([my_reward]))

The tools are Python functions; their JSON schemas (envs/tools.py `get_json_schema`) are the environment's
`tool_defs`, which the chat template renders into the system turn. After each model turn:

- a turn without tool-call markup (`<tool_call>` / `</tool_call>`) completes the episode (the final answer);
- otherwise the turn's XML is parsed (`chat.parse` with the tools' schemas, so a parameter declared a string stays
  one) and each call becomes one `tool` message, in order: its result, or the documented error message of
  envs/tools.py when the XML does not parse (one `malformed` message for the turn), the tool is unknown, the
  arguments do not fit the signature or the schema, or the tool raises, runs past `timeout` or returns a
  non-string. The episode always goes on; nothing the model writes can stop it but `max_turns` and the budget.

Counters in `state.counts`: `valid` calls (they parse, name a tool and bind to its arguments), `invalid` calls
(`malformed`, `unknown_tool`, `bad_arguments`), and one count per error kind. A valid call whose tool then
fails (exception, timeout, non-string) is the tool's fault and still valid. The assistant message gets the
parsed `tool_calls` of its valid calls, so a rubric can read them.

`tools_for(state)` gives the callables of one episode (by default the declared functions; an environment whose
tools read per-episode data binds them there, as envs/lookup.py does); the arguments are checked against the
declared function, whose signature and schema the model was shown.
"""

from __future__ import annotations

from collections.abc import Callable

from nemotron3 import chat
from nemotron3.envs.base import MultiTurnEnv, Rubric, State
from nemotron3.envs.tools import MODEL_ERRORS, ToolResult, call_tool, check_arguments, get_json_schema, tool_error

TOOL_CALL_TAGS = ("<tool_call>", "</tool_call>")


class ToolEnv(MultiTurnEnv):
    def __init__(self, tools: list[Callable], rubric: Rubric | None = None, max_turns: int = 8,
                 timeout: float = 5.0, system_prompt: str | None = None) -> None:
        if not tools:
            raise ValueError("a ToolEnv needs at least one tool")
        self.tools = list(tools)
        self.tool_map = {t.__name__: t for t in self.tools}
        if len(self.tool_map) != len(self.tools):
            raise ValueError(f"tool names must be distinct, got {[t.__name__ for t in self.tools]}")
        self.schemas = {name: get_json_schema(t) for name, t in self.tool_map.items()}
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        super().__init__(rubric, max_turns=max_turns, system_prompt=system_prompt,
                         tool_defs=list(self.schemas.values()))

    def tools_for(self, state: State) -> dict[str, Callable]:
        """The callables of this episode, by name."""
        return self.tool_map

    def is_completed(self, state: State) -> bool:
        text = state.messages[-1]["content"]
        return not any(tag in text for tag in TOOL_CALL_TAGS)

    def call(self, name: str, args: object, state: State) -> ToolResult:
        """One parsed call: checked, then run with the time limit."""
        declared = self.tool_map.get(name)
        if declared is None:
            return tool_error("unknown_tool", name, ", ".join(self.tool_map))
        problem = check_arguments(declared, self.schemas[name], args)
        if problem is not None:
            return tool_error("bad_arguments", name, problem)
        return call_tool(self.tools_for(state)[name], args, self.timeout, name)

    def env_response(self, state: State) -> list[dict]:
        turn = state.messages[-1]
        try:
            calls = chat.parse(turn["content"], tools=self.tool_defs)["tool_calls"]
        except (ValueError, RecursionError) as e:
            calls, results = [], [tool_error("malformed", "", str(e).removeprefix("invalid tool call XML: ")[:160])]
        else:
            results = [self.call(c["name"], c["arguments"], state) for c in calls]
            if not calls:  # markup, but no <tool_call>...</tool_call> pair (chat.parse saw none)
                results = [tool_error("malformed", "", "no complete <tool_call>...</tool_call> block")]
        valid = []
        for i, r in enumerate(results):
            if r.error in MODEL_ERRORS:
                state.counts["invalid"] += 1
            else:
                state.counts["valid"] += 1
                valid.append(calls[i])
            if r.error is not None:
                state.counts[r.error] += 1
        if valid:
            turn["tool_calls"] = valid
        return [{"role": "tool", "content": r.content} for r in results]
