"""The interactive chat: talk to a checkpoint in the terminal, reasoning streamed apart from the answer.

    nemotron3 chat --model runs/sft/final
    nemotron3 chat --model runs/sft/final --no-think --temperature 0 --system "Answer briefly."
    nemotron3 chat --model DIR --max-thinking-tokens 64

Each line you type is a user turn; the whole conversation is rendered with the chat format
(nemotron3/chat.py: earlier turns' reasoning dropped, as the template does) and the assistant's reply
streams as the engine produces it: the reasoning inside `<think>` dimmed, then the answer. The reply ends
at `<|im_end|>` (or `--max-new-tokens`), is parsed back into content / reasoning / tool calls and kept in
the conversation; a reply cut off before its reasoning closed has no answer to keep, so that turn (question
and reply) is dropped, with a note. Commands, typed as a line of their own:

    /think          reasoning on (the default)
    /no_think       reasoning off: the generation prompt ends with an empty think block
    /budget N       cap the reasoning at N tokens (engine/thinking.py); /budget off removes the cap
    /reset          forget the conversation (the system prompt stays)
    /help           this list
    /exit, /quit    leave (so does end of input, Ctrl-D)

Also callable: `chat_session(cfg, lines, console)` reads the turns from any iterable of lines and returns
the conversation, which is how the tests drive it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from nemotron3 import chat
from nemotron3.engine.folder import OpenFolder, open_folder
from nemotron3.engine.params import SamplingParams
from nemotron3.engine.text import TextStream, not_utf8
from nemotron3.options import CPU_COUNT, ConfigError, StageConfig, device_of, device_option, fail, option

HELP = """commands: /think  /no_think  /budget N | /budget off  /reset  /help  /exit"""


@dataclass
class ChatConfig(StageConfig):
    """An interactive chat with a checkpoint: the model, the reasoning mode and the sampling settings."""

    stage = "chat"

    model: Path = option(help="checkpoint folder with a tokenizer.json that has the chat tokens")
    system: str | None = option(None, "system prompt, the conversation's first turn")
    no_think: bool = option(False, "start with reasoning off (toggle with /think and /no_think)")
    max_thinking_tokens: int | None = option(None, "cap the reasoning at N tokens (change with /budget N)", min=0,
                                             metavar="N")
    max_new_tokens: int = option(512, "tokens per reply at most", min=1)
    temperature: float = option(0.6, "sampling temperature (0 = greedy)", min=0.0)
    top_k: int = option(0, "keep the k most likely tokens (0 = off)", min=0)
    top_p: float = option(0.95, "nucleus sampling mass (1 = off)", min=0.0, max=1.0)
    seed: int | None = option(None, "seed of the first reply's sampling (later replies use seed + turn)", min=0)
    speculative: int | None = option(None, "MTP speculative decoding with K drafted tokens per verify forward "
                                     "(default: the device's, engine/params.py: off on a CPU, where it was measured "
                                     "slower)", min=0, metavar="K")
    dtype: str = option("float32", "weights' dtype in memory", choices=("float32", "bfloat16"))
    device: str = device_option()
    threads: int | None = option(None, "torch intra-op threads (default: torch's; at most the CPUs this process may "
                                 "use)", min=1, max=CPU_COUNT)
    compile: bool = option(False, "torch.compile the decode step (slow first reply)")
    strict_finite: bool = option(False, "refuse a checkpoint with NaN or inf in a weight (default: load it, "
                                 "warning once per such tensor)")

    def validate(self) -> None:
        super().validate()
        if self.system is not None and (problem := not_utf8(self.system)):
            fail(self, "system", problem)


@dataclass
class ChatState:
    """What the commands change between turns."""

    thinking: bool
    budget: int | None
    messages: list[dict]


def _command(line: str, state: ChatState, system: list[dict], console: Console) -> bool:
    """Apply one /command; False for /exit."""
    word, _, arg = line.partition(" ")
    arg = arg.strip()
    if word in ("/exit", "/quit"):
        return False
    if word == "/think":
        state.thinking = True
    elif word == "/no_think":
        state.thinking = False
    elif word == "/budget":
        if arg in ("off", "none", ""):
            state.budget = None
        elif arg.isdigit():
            state.budget = int(arg)
        else:
            console.print(f"[red]/budget takes a number of tokens or 'off', not {escape(arg)!r}[/]")
            return True
    elif word == "/reset":
        state.messages = list(system)
    elif word == "/help":
        console.print(HELP)
        return True
    else:
        console.print(f"[red]unknown command {escape(word)}[/]; {HELP}")
        return True
    budget = "no budget" if state.budget is None else f"budget {state.budget} tokens"
    console.print(f"[cyan]reasoning {'on' if state.thinking else 'off'}, {budget}"
                  f"{', conversation reset' if word == '/reset' else ''}[/]")
    return True


def _reply(served: OpenFolder, cfg: ChatConfig, state: ChatState, turn: int, console: Console) -> dict:
    """Stream one assistant reply to the console; return it as a message (content, reasoning, tool calls)."""
    prefix = served.tokenizer.render(state.messages, add_generation_prompt=True, enable_thinking=state.thinking)
    ids = served.encode(prefix)
    room = served.engine.max_seq_len - len(ids)
    if room < 1:
        raise ValueError(f"the conversation ({len(ids)} tokens) fills the context "
                         f"({served.engine.max_seq_len}); /reset to start over")
    tok = served.tokenizer
    think_end = tok.think_end_id
    seed = None if cfg.seed is None else cfg.seed + turn
    params = SamplingParams(max_tokens=min(cfg.max_new_tokens, room), temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, seed=seed, stop_token_ids=served.chat_stops,
                            num_speculative_tokens=cfg.speculative,
                            max_thinking_tokens=state.budget if state.thinking else None)
    steps = served.engine.stream([ids], params)
    text = TextStream(tok)
    in_reasoning = state.thinking
    if in_reasoning:
        console.print("[dim]<think>[/]")
    new: list[int] = []
    for step in steps:
        token = step[0]
        if token is None:
            break
        new.append(token)
        if token in served.chat_stops:
            continue
        piece = text.push(token)
        if token == think_end:
            in_reasoning = False
            console.print("[dim]</think>[/]")
            continue
        console.print(escape(piece), style="dim" if in_reasoning else None, end="", soft_wrap=True)
    console.print()
    body = tok.decode([t for t in new if t not in served.chat_stops], skip_special_tokens=False)
    # the generation prompt opened the think block (or closed an empty one); parse sees the whole turn
    opened = prefix[prefix.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n"):]
    try:
        parsed = chat.parse(opened + body)
    except ValueError as e:  # a malformed tool call: keep the reply as plain text
        console.print(f"[yellow]{escape(str(e))}; kept as text[/]")
        parsed = {"content": body, "reasoning_content": None, "tool_calls": []}
    message = {"role": "assistant", "content": parsed["content"]}
    if parsed["reasoning_content"]:
        message["reasoning_content"] = parsed["reasoning_content"]
    if parsed["tool_calls"]:
        message["tool_calls"] = parsed["tool_calls"]
    s = served.engine.last_stats
    console.print(f"[dim][{s['new_tokens']} tokens, {s['decode_tok_s']:.0f} tok/s][/]")
    return message


def chat_session(cfg: ChatConfig, lines: Iterable[str], console: Console | None = None) -> list[dict]:
    """Run the chat over `lines` (the user's input, one turn or command per line); returns the conversation."""
    cfg.validate()
    device = device_of(cfg)
    console = console or Console()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    served = open_folder(cfg.model, cfg.dtype, cfg.compile, strict_finite=cfg.strict_finite, device=device)
    if served.tokenizer is None or served.tokenizer.token_to_id("<|im_start|>") is None:
        raise ConfigError(f"model (--model) {cfg.model}: chat needs a tokenizer.json with the chat tokens "
                          "(<|im_start|>, <|im_end|>, <think>, </think>)")
    if cfg.max_thinking_tokens is not None and not served.has_think:
        raise ConfigError(f"--max-thinking-tokens needs a tokenizer with <think> and </think> ({cfg.model})")
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    state = ChatState(not cfg.no_think, cfg.max_thinking_tokens, list(system))
    turn = 0
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(line, state, system, console):
                break
            continue
        if problem := not_utf8(line):  # bytes that are not UTF-8 on stdin: say so, and wait for the next line
            console.print(f"[red]this line {escape(problem)}; it was not sent[/]")
            continue
        state.messages.append({"role": "user", "content": line})
        try:
            reply = _reply(served, cfg, state, turn, console)
        except ValueError as e:
            reply = None
            console.print(f"[red]{escape(str(e))}[/]")
        turn += 1
        if reply is not None and not reply["content"] and not reply.get("tool_calls"):
            console.print("[yellow]the reply ended inside its reasoning (raise --max-new-tokens or set /budget N): "
                          "the turn is not kept in the conversation[/]")
            reply = None
        if reply is None:
            state.messages.pop()
        else:
            state.messages.append(reply)
    return state.messages


def _terminal_lines() -> Iterator[str]:
    """Lines typed at the prompt (with readline editing on a terminal) or piped in, until end of input. Bytes
    that are not UTF-8 arrive as lone surrogates (surrogateescape), which chat_session refuses line by line,
    rather than as a UnicodeDecodeError that would end the chat."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input("you> ")
        except EOFError:
            print()
            return


def main(cfg: ChatConfig) -> int:
    """`nemotron3 chat`: the interactive loop on the terminal (or on lines piped to stdin)."""
    console = Console(highlight=False)
    console.print(f"[bold]nemotron3 chat[/] {cfg.model}; {HELP}")
    chat_session(cfg, _terminal_lines(), console)
    return 0
