"""Formats → canonical conversations, and reading files: every supported row
shape, field mapping, system prompts, and bad input as clear errors naming the
file, the line or row, and the field."""
from __future__ import annotations

import json

import pytest

from jaxsft.data import Conversation, Message, iter_examples, load_examples, to_conversation
from jaxsft.data.formats import detect_format, label_answer


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
  """Keep `datasets`' arrow cache out of the home directory."""
  import datasets.config
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
  return str(path)


def roles(conv):
  return [(m.role, m.content) for m in conv.messages]


# --- formats ------------------------------------------------------------------------------------

def test_alpaca_instruction_input_history_system():
  row = {"instruction": "Translate.", "input": "你好", "output": "Hello",
         "history": [["Hi", "Hello!"]], "system": "Be brief."}
  conv = to_conversation(row, "alpaca", "a.jsonl:3")
  assert roles(conv) == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"),
                         ("user", "Translate.\n你好"), ("assistant", "Hello")]
  assert conv.kind == "chat" and conv.source == "a.jsonl:3"
  # input empty or null: the instruction alone.
  for extra in ({"input": ""}, {"input": None}, {}):
    conv = to_conversation({"instruction": "Hi", "output": "Yes", **extra}, "alpaca")
    assert roles(conv) == [("user", "Hi"), ("assistant", "Yes")]


def test_system_prompt_is_used_only_when_the_row_has_none():
  row = {"instruction": "Hi", "output": "Yes"}
  assert roles(to_conversation(row, "alpaca", system_prompt="Task A."))[0] == ("system", "Task A.")
  own = to_conversation({**row, "system": "Mine."}, "alpaca", system_prompt="Task A.")
  assert roles(own)[0] == ("system", "Mine.")
  sharegpt = {"conversations": [{"from": "system", "value": "Mine."},
                                {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes"}]}
  assert roles(to_conversation(sharegpt, "sharegpt", system_prompt="Task A.")) == [
      ("system", "Mine."), ("user", "Hi"), ("assistant", "Yes")]


def test_columns_map_canonical_fields_to_the_files_names():
  row = {"question": "Hi", "answer": "Yes", "ctx": ""}
  conv = to_conversation(row, "alpaca", columns={"instruction": "question", "output": "answer",
                                                 "input": "ctx"})
  assert roles(conv) == [("user", "Hi"), ("assistant", "Yes")]
  row = {"dialog": [{"speaker": "human", "text": "Hi"}, {"speaker": "gpt", "text": "Yes"}]}
  conv = to_conversation(row, "sharegpt",
                         columns={"conversations": "dialog", "from": "speaker", "value": "text"})
  assert roles(conv) == [("user", "Hi"), ("assistant", "Yes")]
  with pytest.raises(ValueError,
                     match=r"a.jsonl:2: missing field 'answer' \(columns\['output'\]\)"):
    to_conversation({"question": "Hi"}, "alpaca", "a.jsonl:2",
                    columns={"instruction": "question", "output": "answer"})


def test_sharegpt_roles_are_mapped_and_unknown_ones_name_the_row():
  row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes"},
                           {"from": "user", "value": "Why?"},
                           {"from": "assistant", "value": "Fine"}], "system": "Be brief."}
  assert roles(to_conversation(row, "sharegpt")) == [
      ("system", "Be brief."), ("user", "Hi"), ("assistant", "Yes"), ("user", "Why?"),
      ("assistant", "Fine")]
  bad = {"conversations": [{"from": "human", "value": "Hi"},
                           {"from": "bot", "value": "{}"}]}
  with pytest.raises(ValueError, match=r"s.jsonl:9: 'conversations'\[1\].from is 'bot'; "
                     r"expected one of \('human', 'user', 'gpt', 'assistant', 'system', "
                     r"'function_call', 'observation'\)"):
    to_conversation(bad, "sharegpt", "s.jsonl:9")
  # A tool result with no call before it.
  bad = {"conversations": [{"from": "human", "value": "Hi"},
                           {"from": "observation", "value": "{}"}]}
  with pytest.raises(ValueError, match=r"s.jsonl:9: .*message 1 is 'tool' where 'assistant' was "
                                       r"expected"):
    to_conversation(bad, "sharegpt", "s.jsonl:9")


def test_turns_must_alternate():
  row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}]}
  with pytest.raises(ValueError, match="m:1: field 'messages' must alternate.*message 1 is 'user'"):
    to_conversation(row, "messages", "m:1")
  row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}]}
  with pytest.raises(ValueError, match="system message at position 1"):
    to_conversation(row, "messages", "m:1")


def test_an_empty_answer_names_its_row_and_field():
  """Every answer trains; an empty one would teach the model to reply with
  nothing. An assistant turn that only calls tools is not empty."""
  chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}
  with pytest.raises(ValueError, match=r"m:3: field 'messages' has an empty assistant answer "
                     r"\(message 1\): trained, it would teach the model to reply with nothing"):
    to_conversation(chat, "messages", "m:3")
  share = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]}
  with pytest.raises(ValueError, match=r"s:2: field 'conversations' has an empty assistant"):
    to_conversation(share, "sharegpt", "s:2")
  with pytest.raises(ValueError, match=r"a:7: field 'output' is empty: trained"):
    to_conversation({"instruction": "Say it", "output": ""}, "alpaca", "a:7")
  with pytest.raises(ValueError, match=r"a:8: field 'history' has an empty assistant answer"):
    to_conversation({"instruction": "Again", "output": "ok", "history": [["Say it", ""]]},
                    "alpaca", "a:8")


def test_messages_and_a_conversation_without_an_answer():
  row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Yes"}]}
  assert roles(to_conversation(row, "messages")) == [("system", "S"), ("user", "Hi"),
                                                     ("assistant", "Yes")]
  # Converted, not rejected: chat objectives drop and count it when encoding.
  only_user = to_conversation({"messages": [{"role": "user", "content": "Hi"}]}, "messages")
  assert roles(only_user) == [("user", "Hi")]


def test_a_pair_whose_answers_are_the_same_is_refused():
  with pytest.raises(ValueError, match=r"p:4: field 'rejected' is the same as 'chosen': the pair "
                     r"teaches the reward model nothing"):
    to_conversation({"prompt": "Why?", "chosen": "Fine ", "rejected": "Fine"}, "pairwise", "p:4")


def test_text_pairwise_label():
  assert to_conversation({"text": "Doc."}, "text", "t:1") == Conversation(kind="text", text="Doc.",
                                                                         source="t:1")
  conv = to_conversation({"prompt": "Why?", "chosen": "Fine", "rejected": "No"}, "pairwise",
                         system_prompt="Be brief.")
  assert (conv.kind, roles(conv), conv.chosen, conv.rejected) == (
      "pairwise", [("system", "Be brief."), ("user", "Why?")], "Fine", "No")
  conv = to_conversation({"prompt": [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Yes"},
                                     {"role": "user", "content": "Why?"}],
                          "chosen": "Fine", "rejected": "No"}, "pairwise")
  assert len(conv.messages) == 3
  with pytest.raises(ValueError, match="'prompt' must end with a user turn"):
    to_conversation({"prompt": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Yes"}],
                     "chosen": "a", "rejected": "b"}, "pairwise", "p:1")
  conv = to_conversation({"text": "Great!", "label": 1}, "label")
  assert (conv.kind, conv.labels, roles(conv)) == ("label", ["1"], [("user", "Great!")])
  conv = to_conversation({"text": "Great!", "labels": ["pos", "short"]}, "label")
  assert conv.labels == ["pos", "short"]
  assert json.loads(label_answer(conv.labels)) == {"labels": ["pos", "short"]}
  with pytest.raises(ValueError, match="'labels' is empty"):
    to_conversation({"text": "x", "labels": []}, "label", "l:1")


def test_detect_format():
  assert detect_format({"conversations": []}) == "sharegpt"
  assert detect_format({"messages": []}) == "messages"
  assert detect_format({"instruction": "", "input": "", "output": ""}) == "alpaca"
  assert detect_format({"prompt": "", "chosen": "", "rejected": ""}) == "pairwise"
  assert detect_format({"text": "", "label": 0}) == "label"
  assert detect_format({"text": ""}) == "text"
  assert detect_format({"q": "", "a": ""}, {"instruction": "q", "output": "a"}) == "alpaca"
  with pytest.raises(ValueError, match=r"x:1: cannot tell the format from the fields \['a', 'q'\]"):
    detect_format({"q": "", "a": ""}, source="x:1")


def test_wrong_types_name_the_field():
  with pytest.raises(ValueError, match="a:4: field 'output' must be a string, got int"):
    to_conversation({"instruction": "Hi", "output": 5}, "alpaca", "a:4")
  with pytest.raises(ValueError, match="a:4: field 'output' is null"):
    to_conversation({"instruction": "Hi", "output": None}, "alpaca", "a:4")
  with pytest.raises(ValueError, match="'history' item 0 must be a \\[user, assistant\\] pair"):
    to_conversation({"instruction": "Hi", "output": "x", "history": [["a"]]}, "alpaca", "a:4")
  with pytest.raises(ValueError, match=r"'messages'\[0\].content must be a string, got list"):
    to_conversation({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages",
                    "m:2")
  with pytest.raises(ValueError, match="field 'messages' must be a list"):
    to_conversation({"messages": "Hi"}, "messages", "m:2")


def test_conversation_dict_round_trip():
  conv = to_conversation({"text": "x", "labels": ["a"], "system": "S"}, "label", "l:1")
  assert Conversation.from_dict(conv.to_dict()) == conv
  assert json.loads(json.dumps(conv.to_dict()))["messages"][0] == {
      "role": "system", "content": "S", "tool_calls": None, "tool_fields": None}


# --- reading files ------------------------------------------------------------------------------

ALPACA = [{"instruction": "Hi", "output": "Yes"}, {"instruction": "Why?", "output": "Fine"}]


def test_jsonl_sources_are_file_and_line(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA[0]).encode() + b"\n\n  \n"
                   + json.dumps(ALPACA[1]).encode())  # BOM, blank lines, no final newline
  convs = load_examples({"path": str(path), "format": "alpaca"})
  assert [c.source for c in convs] == [f"{path}:1", f"{path}:4"]
  assert roles(convs[1]) == [("user", "Why?"), ("assistant", "Fine")]


def test_malformed_json_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(ALPACA[0]) + '\n{"instruction": "Hi", "output": \n', "utf-8")
  with pytest.raises(ValueError, match=f"{path}:2: invalid JSON \\(Expecting value at column 33"):
    load_examples({"path": str(path)})
  path.write_text("[1, 2]\n", "utf-8")
  path.rename(tmp_path / "list.jsonl")
  with pytest.raises(ValueError, match="list.jsonl:1: expected a JSON object with named fields"):
    load_examples({"path": str(tmp_path / "list.jsonl")})


def test_missing_field_and_wrong_type_in_a_file(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", [ALPACA[0], {"instruction": "Hi", "answer": "x"}])
  with pytest.raises(ValueError, match=f"{path}:2: missing field 'output' \\(format alpaca\\); the "
                     "row has fields \\['answer', 'instruction'\\]; map it with columns="):
    load_examples({"path": path, "format": "alpaca"})
  path = write_jsonl(tmp_path / "b.jsonl", [ALPACA[0], {"instruction": ["Hi"], "output": "x"}])
  with pytest.raises(ValueError, match=f"{path}:2: field 'instruction' must be a string, got list"):
    load_examples({"path": path})  # auto: alpaca, from the first row


def test_empty_file(tmp_path):
  for name, content in (("e.jsonl", ""), ("blank.jsonl", "\n \n"), ("e.json", "[]"),
                        ("e.csv", "instruction,output\n")):
    (tmp_path / name).write_text(content, "utf-8")
    with pytest.raises(ValueError, match=f"{tmp_path / name}: no rows"):
      load_examples({"path": str(tmp_path / name)})


def test_non_utf8_bytes(tmp_path):
  path = tmp_path / "gbk.jsonl"
  good = (json.dumps(ALPACA[0]) + "\n").encode()
  path.write_bytes(good + '{"instruction": "你好", "output": "x"}\n'.encode("gbk"))
  with pytest.raises(ValueError, match=f"{path}: not UTF-8 at byte {len(good) + 17} \\(line 2\\)"):
    load_examples({"path": str(path)})
  csv = tmp_path / "gbk.csv"
  csv.write_bytes(b"instruction,output\n" + "你好,x\n".encode("gbk"))
  with pytest.raises(ValueError, match=f"{csv}: not UTF-8 at byte 19 \\(line 2\\)"):
    load_examples({"path": str(csv)})


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
  array = tmp_path / "arr.json"
  array.write_text(json.dumps(ALPACA, indent=2), "utf-8")
  convs = load_examples({"path": str(array)})
  assert [c.source for c in convs] == [f"{array}:row 1", f"{array}:row 2"]
  lines = write_jsonl(tmp_path / "lines.json", ALPACA)
  assert [c.source for c in load_examples({"path": lines})] == [f"{lines}:1", f"{lines}:2"]
  single = tmp_path / "one.json"
  single.write_text(json.dumps({"data": ALPACA}, indent=2), "utf-8")
  with pytest.raises(ValueError, match="one.json: holds a single JSON object .* not rows"):
    load_examples({"path": str(single)})
  # A dict of lists on one line (datasets' Dataset.to_dict() dumped as is).
  columnar = tmp_path / "columnar.json"
  columnar.write_text(json.dumps({k: [r[k] for r in ALPACA] for k in ALPACA[0]}), "utf-8")
  with pytest.raises(ValueError, match=r"columnar.json: holds columns \(fields \[.*\], each a "
                     rf"list of {len(ALPACA)} values\), not rows"):
    load_examples({"path": str(columnar)})
  one_row = write_jsonl(tmp_path / "one_row.json", ALPACA[:1])  # a single row is still a row
  assert len(load_examples({"path": one_row})) == 1
  broken = tmp_path / "broken.json"
  broken.write_text('[\n  {"instruction": "Hi",\n   "output": }\n]', "utf-8")
  with pytest.raises(ValueError, match="broken.json:3: invalid JSON"):
    load_examples({"path": str(broken)})


def test_globs_and_directories(tmp_path):
  write_jsonl(tmp_path / "b.jsonl", ALPACA[1:])
  write_jsonl(tmp_path / "a.jsonl", ALPACA[:1])
  (tmp_path / "notes.txt").write_text("ignored", "utf-8")
  by_glob = load_examples({"path": str(tmp_path / "*.jsonl")})
  by_dir = load_examples({"path": str(tmp_path)})
  assert [c.source for c in by_glob] == [c.source for c in by_dir] == [
      f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'b.jsonl'}:1"]
  with pytest.raises(ValueError, match="no files match this pattern"):
    load_examples({"path": str(tmp_path / "*.parquet")})
  with pytest.raises(ValueError, match="missing.jsonl: no such file or directory"):
    load_examples({"path": str(tmp_path / "missing.jsonl")})


def test_parquet_csv_and_saved_datasets(tmp_path):
  import datasets
  rows = {"question": ["Hi", "Why?"], "answer": ["42", "Fine"]}
  datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "d.parquet"))
  (tmp_path / "d.csv").write_text("question,answer\nHi,42\nWhy?,Fine\n", "utf-8")
  datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                        "test": datasets.Dataset.from_dict({"question": ["Q"], "answer": ["A"]})}
                       ).save_to_disk(str(tmp_path / "saved"))
  spec = {"format": "alpaca", "columns": {"instruction": "question", "output": "answer"}}
  for name in ("d.parquet", "d.csv", "saved"):
    convs = load_examples({**spec, "path": str(tmp_path / name)})
    # CSV cells stay text: "42" is not turned into a number.
    assert [roles(c) for c in convs] == [[("user", "Hi"), ("assistant", "42")],
                                         [("user", "Why?"), ("assistant", "Fine")]], name
  assert convs[1].source == f"{tmp_path / 'saved'}[train]:row 2"
  test = load_examples({**spec, "path": str(tmp_path / "saved"), "split": "test"})
  assert roles(test[0]) == [("user", "Q"), ("assistant", "A")]
  with pytest.raises(ValueError, match="saved dataset has no split 'dev'; its splits are "
                     "\\['test', 'train'\\]"):
    load_examples({**spec, "path": str(tmp_path / "saved"), "split": "dev"})
  with pytest.raises(ValueError, match="d.parquet:row 1: missing field 'output'"):
    load_examples({"path": str(tmp_path / "d.parquet"), "format": "alpaca",
                   "columns": {"instruction": "question"}})


def test_hub_name_fails_clearly_here():
  with pytest.raises(ValueError, match="dataset 'someone/some-dataset': no local file, directory "
                     "or glob matches this path, so it was looked up on the Hugging Face hub.*"
                     "unreachable"):
    load_examples({"path": "someone/some-dataset"})


def test_spec_checks(tmp_path):
  from ml_collections import ConfigDict
  path = write_jsonl(tmp_path / "a.jsonl", [{"text": "Doc one."}, {"text": "Doc two."}])
  convs = load_examples(ConfigDict({"path": path, "format": "auto", "weight": 2.0}))
  assert [c.kind for c in convs] == ["text", "text"]
  with pytest.raises(ValueError, match="system_prompt is set, but its rows are plain text"):
    load_examples({"path": path, "system_prompt": "Be brief."})
  with pytest.raises(ValueError, match="system_prompt is set, but format text has no prompt"):
    load_examples({"path": path, "format": "text", "system_prompt": "Be brief."})
  with pytest.raises(ValueError, match="columns key 'instrucion' is not a field of format alpaca"):
    load_examples({"path": path, "format": "alpaca", "columns": {"instrucion": "q"}})
  with pytest.raises(ValueError, match="format 'chatml' is not one of"):
    load_examples({"path": path, "format": "chatml"})
  with pytest.raises(ValueError, match="'path' .* is required"):
    load_examples({"format": "text"})
  # Streaming: rows come one at a time, errors when reached.
  bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "ok"}, {"text": 3}])
  stream = iter_examples({"path": bad})
  assert next(stream).text == "ok"
  with pytest.raises(ValueError, match="b.jsonl:2: field 'text' must be a string, got int"):
    next(stream)


def test_message_rejects_unknown_roles():
  with pytest.raises(ValueError, match="message role 'function'"):
    Message("function", "x")
  with pytest.raises(ValueError, match="a user message cannot carry tool_calls"):
    Message("user", "x", "[]")
