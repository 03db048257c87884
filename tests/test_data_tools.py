"""Tool use (function calling) in chat data: OpenAI messages and LLaMA-Factory's
sharegpt, rendered by the tokenizer's chat template, checked against
transformers' ``apply_chat_template`` with its assistant mask."""
from __future__ import annotations

import json

import numpy as np
import pytest

import hf_builders
from jaxsft.data import formats, templates
from jaxsft.data import pipeline as data_pipeline

# A Qwen2.5-style template that writes tools into the system turn, calls as
# <tool_call> JSON and results as a tool turn. Its {% generation %} blocks let
# transformers compute the mask of the assistant's tokens (the reference).
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}"
    "<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{{ m.content or '' }}{% for c in m.tool_calls or [] %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>{% endgeneration %}\n"
    "{%- elif m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]},
    {"role": "tool", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"},
    {"role": "assistant", "content": "It is 21 degrees and clear in Paris."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."}]
OPENAI_ROW = {"messages": MESSAGES, "tools": TOOLS}
SHAREGPT_ROW = {  # as LLaMA-Factory's glaive_toolcall data writes it
    "system": "You are a helpful assistant.", "tools": json.dumps(TOOLS),
    "conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": "{\"temperature\": 21, \"sky\": \"clear\"}"},
        {"from": "gpt", "value": "It is 21 degrees and clear in Paris."},
        {"from": "human", "value": "Thanks!"},
        {"from": "gpt", "value": "You are welcome."}]}


@pytest.fixture(scope="module")
def tok():
  t = hf_builders.build_tokenizer()
  t.chat_template = TOOL_TEMPLATE
  return t


@pytest.mark.parametrize("row,fmt", [(OPENAI_ROW, "messages"), (SHAREGPT_ROW, "sharegpt")])
def test_tool_conversations_tokenize_as_transformers_renders_them(tok, row, fmt):
  """ids = apply_chat_template(messages, tools=...); trained tokens = its
  assistant mask: the calls and answers with their end-of-turn, not the tool
  results, the schemas or the prompts."""
  conv = formats.to_conversation(row, fmt, "tools.jsonl:1")
  enc = templates.encode(conv, templates.get_template("tokenizer", tok), tok)
  ref = tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
  assert enc.input_ids == list(ref["input_ids"])
  assert enc.loss_mask == list(ref["assistant_masks"])
  trained = tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m])
  assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in trained
  assert "temperature" not in trained and "Tools" not in trained


def test_call_ids_reach_templates_that_pair_results_with_calls(tok):
  """OpenAI's call ``id`` and the tool turn's ``tool_call_id``/``name`` are
  passed to the template (Mistral's pairs results with calls by id): ids and
  mask as transformers renders the same messages."""
  template = (TOOL_TEMPLATE.replace("<tool_call>", "<tool_call>{{ c.id }}:")
              .replace("<|im_start|>tool\n{{ m.content }}",
                       "<|im_start|>tool\n{{ m.tool_call_id }} {{ m.name }}: {{ m.content }}"))
  t = hf_builders.build_tokenizer()
  t.chat_template = template
  messages = json.loads(json.dumps(MESSAGES))
  messages[2]["tool_calls"][0]["id"] = "call9"
  messages[3].update(tool_call_id="call9", name="get_weather")
  conv = formats.to_conversation({"messages": messages, "tools": TOOLS}, "messages", "m:1")
  enc = templates.encode(conv, templates.get_template("tokenizer", t), t)
  ref = t.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=True,
                              return_assistant_tokens_mask=True)
  assert enc.input_ids == list(ref["input_ids"])
  assert enc.loss_mask == list(ref["assistant_masks"])
  assert "call9 get_weather:" in t.decode(enc.input_ids)
  # Through the Arrow round trip too.
  assert formats.Conversation.from_dict(conv.to_dict()) == conv


def test_tool_rows_survive_the_pipeline(tok, tmp_path):
  """Through datasets' Arrow tables and the token cache: the packed example is
  the one ``encode`` gives."""
  paths = []
  for name, row in (("openai", OPENAI_ROW), ("sharegpt", SHAREGPT_ROW)):
    paths.append(tmp_path / f"{name}.jsonl")
    paths[-1].write_text(json.dumps(row) + "\n")
  pipe = data_pipeline.build(dict(datasets=[str(p) for p in paths], template="tokenizer",
                                  cache_dir=str(tmp_path / "cache"), packing=False),
                             tok, seq_len=1024)
  batch = next(pipe.batches(2))
  want = templates.encode(formats.to_conversation(OPENAI_ROW, "messages"),
                          templates.get_template("tokenizer", tok), tok)
  n = len(want.input_ids)
  for row in range(2):
    np.testing.assert_array_equal(batch["tokens"][row, :n], want.input_ids)
    np.testing.assert_array_equal(batch["loss_mask"][row, :n], want.loss_mask)
    assert not batch["segment_ids"][row, n:].any()


def test_tool_use_errors_name_the_row_and_what_to_do(tok):
  conv = formats.to_conversation(OPENAI_ROW, "messages", "tools.jsonl:3")
  with pytest.raises(ValueError, match=r"tools.jsonl:3: tool calls, tool results and tool "
                                       r"schemas .*\(data\.template='tokenizer'\)"):
    templates.encode(conv, templates.get_template("chatml", tok), tok)
  plain = hf_builders.build_tokenizer()  # ChatML that writes content only: no tools, no calls
  with pytest.raises(ValueError, match=r"tools.jsonl:3: template 'tokenizer' does not write the "
                                       r"tools or tool calls .* never names \['get_weather'\]"):
    templates.encode(conv, templates.get_template("tokenizer", plain), plain)
  bad = json.loads(json.dumps(SHAREGPT_ROW))
  bad["conversations"][1]["value"] = "get_weather(Paris)"
  with pytest.raises(ValueError, match=r"s:2: 'conversations'\[1\].value is not valid JSON"):
    formats.to_conversation(bad, "sharegpt", "s:2")
  bad["conversations"][1]["value"] = json.dumps({"arguments": {}})
  with pytest.raises(ValueError, match=r"s:2: 'conversations'\[1\].value\[0\] must be a call "
                                       r"with a function name"):
    formats.to_conversation(bad, "sharegpt", "s:2")
  bad = {"messages": MESSAGES[:3] + MESSAGES[4:], "tools": TOOLS}  # the call's result is missing
  with pytest.raises(ValueError, match=r"m:4: .*message 3 is 'assistant' where 'tool' was "
                                       r"expected after an assistant turn with tool calls"):
    formats.to_conversation(bad, "messages", "m:4")
  with pytest.raises(ValueError, match=r"m:4: field 'tools' must be a list of function schemas"):
    formats.to_conversation({"messages": MESSAGES, "tools": {"a": 1}}, "messages", "m:4")


def test_alpaca_rows_take_a_tools_column(tok):
  """LLaMA-Factory's alpaca format with its ``tools`` column: the schemas are
  rendered as transformers renders the same chat with ``tools=``."""
  row = {"instruction": "Which tool tells the weather?", "input": "", "output": "get_weather.",
         "system": "You are a helpful assistant.", "tools": json.dumps(TOOLS)}
  conv = formats.to_conversation(row, "alpaca", "a.jsonl:1")
  enc = templates.encode(conv, templates.get_template("tokenizer", tok), tok)
  messages = [{"role": "system", "content": row["system"]},
              {"role": "user", "content": row["instruction"]},
              {"role": "assistant", "content": row["output"]}]
  ref = tok.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
  assert enc.input_ids == list(ref["input_ids"])
  assert enc.loss_mask == list(ref["assistant_masks"])
  assert "get_weather" in tok.decode(enc.input_ids[:enc.loss_mask.index(1)])  # in the prompt


def test_keep_answer_shortens_chats_that_only_list_tools(tok):
  """Under truncation='keep_answer' a chat that lists tool schemas but calls
  none is shortened like any chat, the schemas kept (rendered as transformers
  renders the shortened chat); one that calls a tool is dropped, since cutting
  its oldest turns could separate a call from its result."""
  history = [{"role": "user", "content": "Tell me about Paris. " * 30},
             {"role": "assistant", "content": "Paris is the capital of France. " * 30}]
  last = [{"role": "user", "content": "Which tool tells the weather?"},
          {"role": "assistant", "content": "get_weather."}]
  system = [MESSAGES[0]]
  row = {"messages": system + history + last, "tools": TOOLS}
  conv = formats.to_conversation(row, "messages", "m:1")
  template = templates.get_template("tokenizer", tok)
  full = templates.encode(conv, template, tok)
  ref = tok.apply_chat_template(system + last, tools=TOOLS, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
  limit = len(ref["input_ids"]) + 5
  assert len(full.input_ids) > limit  # the history does not fit
  counts = templates.Counts()
  enc = templates.encode(conv, template, tok, max_length=limit, truncation="keep_answer",
                         counts=counts)
  assert counts.truncated == 1 and counts.dropped_too_long == 0
  assert enc.input_ids == list(ref["input_ids"])
  assert enc.loss_mask == list(ref["assistant_masks"])

  calls = formats.to_conversation(OPENAI_ROW, "messages", "m:2")
  n = len(templates.encode(calls, template, tok).input_ids)
  counts = templates.Counts()
  assert templates.encode(calls, template, tok, max_length=n - 1, truncation="keep_answer",
                          counts=counts) is None
  assert counts.dropped_too_long == 1 and counts.truncated == 0
