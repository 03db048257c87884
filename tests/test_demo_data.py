"""The embedded demo's data: the committed files are exactly what
tools/make_demo_data.py writes, and its tokenizer works with transformers."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"


def load_script():
  path = ROOT / "tools" / "make_demo_data.py"
  spec = importlib.util.spec_from_file_location("make_demo_data", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def files_under(d: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def read_jsonl(name: str) -> list[dict]:
  return [json.loads(line) for line in (DEMO / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(DEMO / "tokenizer")


def test_committed_data_equals_a_fresh_generation(tmp_path):
  # If this fails after editing the script, rerun: python tools/make_demo_data.py
  load_script().write(tmp_path)
  committed, fresh = files_under(DEMO), files_under(tmp_path)
  assert sorted(committed) == sorted(fresh)
  differ = [name for name in fresh if committed[name] != fresh[name]]
  assert not differ, f"data/demo differs from the script's output: {differ}"


def test_demo_data_is_small():
  assert sum(len(b) for b in files_under(DEMO).values()) < 2_000_000


def test_tokenizer_loads_and_round_trips(tokenizer):
  script = load_script()
  assert len(tokenizer) == script.VOCAB_SIZE
  assert tokenizer.convert_tokens_to_ids(script.SPECIAL_TOKENS) == [0, 1, 2, 3, 4]
  assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
  samples = [read_jsonl("corpus.jsonl")[0]["text"], read_jsonl("instructions.jsonl")[0]["output"],
             read_jsonl("intent_test.jsonl")[0]["messages"][1]["content"],
             "Unseen text: héllo wörld 123 ☎ {\"x\": [1, 2]}\n\tend"]
  for text in samples:
    ids = tokenizer(text)["input_ids"]
    # ChatML-style: no <s> is prepended (make_demo_data.py's docstring says why).
    assert ids[0] != tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text


def test_chat_template_is_chatml(tokenizer):
  messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                  "<|im_start|>assistant\n")
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
  # The markers are single special tokens, and the template adds no <s>.
  ids = ids["input_ids"]
  assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
  assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2
  assert tokenizer.decode(ids) == text


def test_intent_splits_are_disjoint_and_labels_agree():
  script = load_script()
  for split in ("train", "test"):
    chats = read_jsonl(f"intent_{split}.jsonl")
    labelled = read_jsonl(f"intent_cls_{split}.jsonl")
    assert len(chats) == len(labelled)
    for chat, row in zip(chats, labelled):
      user, answer = chat["messages"]
      assert user["content"] == row["text"]
      label = json.loads(answer["content"])
      assert list(label) == ["domain", "intents", "priority"]
      assert sorted(label["intents"]) == row["labels"]
      assert set(label["intents"]) <= set(script.INTENTS[label["domain"]])
  train = {r["text"] for r in read_jsonl("intent_cls_train.jsonl")}
  test = {r["text"] for r in read_jsonl("intent_cls_test.jsonl")}
  assert len(test) == script.N_INTENT_TEST and not train & test
