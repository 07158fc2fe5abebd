"""The server renders chat prompts with the checkpoint folder's own chat template.

A tiny checkpoint whose tokenizer_config.json carries a template other than ours (Nemotron 3 Nano's when
tests/chat/templates/ holds it, else one written here): the ids the server hands the scheduler, and its
`usage.prompt_tokens`, equal `<s>` + transformers' `apply_chat_template(..., tokenize=True)` on the same request.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import eval_checkpoint
from serving import Running

from nemotron3.serve import ServeConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")

NANO3 = Path(__file__).parents[1] / "chat" / "templates" / "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja"
# not ours: a default system turn, tools as a JSON list, no think block in the history
FALLBACK = """{{- '<|im_start|>system\\n' ~ (messages[0].content if messages[0].role == 'system' else 'Default.') }}
{%- if tools %}{{ '\\nTools: ' ~ (tools | tojson) }}{% endif %}
{{- '<|im_end|>\\n' }}
{%- for m in messages if m.role != 'system' %}
{{- '<|im_start|>' ~ m.role ~ '\\n' ~ (m.content or '') ~ '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' ~ ('<think>\\n' if enable_thinking else '') }}{% endif %}
"""
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
REQUESTS = [
    ({"messages": [{"role": "user", "content": "What is 7 * 6?"}]}, True),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}],
      "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}}, False),
    ({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4",
                                                        "reasoning_content": "two and two"},
                   {"role": "user", "content": "and 3+3?"}]}, True),
]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served") / "tpl"
    eval_checkpoint(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = NANO3.read_text() if NANO3.is_file() else FALLBACK
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    s = Running(ServeConfig(model=folder, max_batch=2, max_seq_len=4096, max_tokens=4, speculative=0))
    prompts: list[list[int]] = []
    submit = s.state.scheduler.submit

    def spy(req, on_event):
        prompts.append(list(req.prompt))
        return submit(req, on_event)

    s.state.scheduler.submit = spy
    yield s, folder, prompts
    s.stop()


@pytest.mark.parametrize("i", range(len(REQUESTS)))
def test_prompt_ids_are_transformers_with_the_folder_template(running, i):
    s, folder, prompts = running
    body, thinking = REQUESTS[i]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    want = [hf.bos_token_id, *hf.apply_chat_template(body["messages"], tools=body.get("tools"),
                                                     add_generation_prompt=True, enable_thinking=thinking,
                                                     tokenize=True, return_dict=True)["input_ids"]]
    prompts.clear()
    status, _, reply = s.raw("POST", "/v1/chat/completions", {"model": "tpl", "max_tokens": 2, **body})
    assert status == 200, reply
    assert prompts == [want]
    assert reply["usage"]["prompt_tokens"] == len(want)
