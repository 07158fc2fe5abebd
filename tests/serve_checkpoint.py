"""A tiny chat checkpoint for the server's tests, made in seconds: it has learnt three replies by heart.

A random model writes noise, which cannot show that reasoning is returned apart from the answer or that a tool
call reaches the client parsed. So the tiny preset is trained for a few hundred Adam steps on three
conversations until greedy decoding reproduces each reply exactly: a reasoning + answer reply (GREETING), a
reasoning + tool call reply (WEATHER), and a reasoning-off answer (GREETING with thinking off). The tokenizer
is nemotron3's own (train/tokenizer.py: the chat format's special tokens), trained on the same text.
"""

from __future__ import annotations

from pathlib import Path

import torch

import nemotron3
from nemotron3 import chat
from nemotron3.train.sft_data import Conversation, encode
from nemotron3.train.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

GREETING = [{"role": "user", "content": "Hello there"}]
GREETING_REASONING = "The user greets me. I greet back."
GREETING_REPLY = "Hi! How can I help you today?"
GREETING_OFF_REPLY = "Hello! Ask me anything."
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_REASONING = "I should call the weather tool."
WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def conversations() -> list[tuple[Conversation, str]]:
    """(conversation with its assistant reply, reasoning mode) for each memorised reply."""
    return [
        (Conversation(GREETING + [{"role": "assistant", "reasoning_content": GREETING_REASONING,
                                   "content": GREETING_REPLY}]), "on"),
        (Conversation(GREETING + [{"role": "assistant", "content": GREETING_OFF_REPLY}]), "off"),
        (Conversation(WEATHER + [{"role": "assistant", "reasoning_content": WEATHER_REASONING, "content": "",
                                  "tool_calls": [WEATHER_CALL]}], TOOLS), "on"),
    ]


def build(folder: Path, mtp: bool = True, steps: int = 200, seed: int = 0, lr: float = 1e-2, stop_loss: float = 0.02
          ) -> Path:
    """Train the tokenizer and the model (until the replies' mean cross-entropy is below `stop_loss`, and the MTP
    head's below ten times that), save both in `folder`; returns it."""
    convs = conversations()
    texts = [chat.render(c.messages, c.tools, enable_thinking=mode != "off") for c, mode in convs]
    tok = Tokenizer.train(texts * 4 + ["once upon a time there was a tiny model"] * 4, vocab_size=400)
    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size)
    if not mtp:
        config = config.replace(num_nextn_predict_layers=0)
    torch.manual_seed(seed)
    model = nemotron3.HybridLM(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a second thread only waits on a busy machine at this size
    exs = [encode(c, tok, mode) for c, mode in convs]
    T = max(len(e.ids) for e in exs)
    ids = torch.zeros(len(exs), T, dtype=torch.long)
    mask = torch.zeros(len(exs), T)
    for i, e in enumerate(exs):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = torch.tensor(e.mask, dtype=torch.float)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        logits, mtp_logits = model.forward_mtp(ids[:, :-1], 1) if mtp else (model(ids[:, :-1]), None)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = main = (ce * mask[:, 1:]).sum() / mask[:, 1:].sum()
        draft = torch.zeros(())
        if mtp:  # the MTP head learns the same replies, so that its drafts are accepted
            ce2 = torch.nn.functional.cross_entropy(mtp_logits[0][:, :-1].transpose(1, 2), ids[:, 2:],
                                                    reduction="none")
            draft = (ce2 * mask[:, 2:]).sum() / mask[:, 2:].sum()
            loss = loss + 0.5 * draft
        opt.zero_grad()
        loss.backward()
        opt.step()
        if main.item() < stop_loss and draft.item() < 10 * stop_loss:
            break
    torch.set_num_threads(threads)
    nemotron3.save_pretrained(model.eval(), folder)
    tok.save(folder)
    return folder
