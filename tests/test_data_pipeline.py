"""The stage pipeline: files → cached tokens → mixed, packed, resumable batches;
eval splits; bad input; and the inspection report and CLI."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import hf_builders
from jaxsft.data import Conversation, Message, encode, get_template, pipeline, report, sources
from jaxsft.data import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
  return hf_builders.build_tokenizer()


def _write(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return str(path)


def _alpaca(n, words="The quick brown fox", start=0):
  return [{"instruction": f"Why {i}?", "output": " ".join([words] * (1 + i % 3))}
          for i in range(start, start + n)]


def _texts(n):
  return [{"text": "Fine-tuning language models " * (1 + i % 3)} for i in range(n)]


@pytest.fixture()
def files(tmp_path):
  return {"chat": _write(tmp_path / "chat.jsonl", _alpaca(30)),
          "text": _write(tmp_path / "text.jsonl", _texts(12)),
          "cache": str(tmp_path / "cache")}


def _cfg(files, **kw):
  cfg = dict(datasets=[dict(path=files["chat"]), dict(path=files["text"])], template="chatml",
             cache_dir=files["cache"], shuffle_buffer=16)
  cfg.update(kw)
  return cfg


def _segments(batch):
  """(ids, mask) of every segment of a batch, row by row."""
  out = []
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      sel = seg == s
      np.testing.assert_array_equal(batch["positions"][r][sel], np.arange(sel.sum()))
      out.append((tuple(batch["tokens"][r][sel]), tuple(batch["loss_mask"][r][sel])))
  return out


def _expected(tok, spec, template="chatml", max_length=None):
  t = get_template(template, tok)
  out = []
  for conv in sources.iter_examples(spec):
    e = encode(conv, t, tok, max_length=max_length)
    if e is not None:
      out.append((tuple(e.input_ids), tuple(e.loss_mask)))
  return out


def test_one_epoch_holds_every_example_with_its_own_mask(tok, files):
  pipe = pipeline.build(_cfg(files), tok, seq_len=64, seed=0)
  batches = list(pipe.batches(4, epochs=1))
  for b in batches:
    assert set(b) == {"tokens", "loss_mask", "segment_ids", "positions"}
    assert all(v.shape == (4, 64) and v.dtype == np.int32 for v in b.values())
  got = collections.Counter(s for b in batches for s in _segments(b))
  chat = _expected(tok, {"path": files["chat"]})
  text = _expected(tok, {"path": files["text"]})
  assert got == collections.Counter(chat + text)
  # Raw text is trained on every token; chats on their answers only.
  assert all(all(m) for _, m in text) and all(0 < sum(m) < len(m) for _, m in chat)
  stats = pipe.stats()
  assert stats["examples"] == stats["kept"] == stats["epoch_examples"] == 42
  assert stats["tokens"] == stats["epoch_tokens"] == sum(len(i) for i, _ in chat + text)
  assert stats["trained_tokens"] == sum(sum(m[1:]) for _, m in chat + text)
  rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches)
  assert rows == stats["epoch_rows"] == pipe.rows_per_epoch(0)
  assert stats["packing_efficiency"] == pytest.approx(stats["tokens"] / (rows * 64))
  assert len(batches) == pipe.steps_per_epoch(4)


def test_unpacked_mode_and_its_efficiency(tok, files):
  cfg = pipeline.default_config()  # the ConfigDict form a stage's config embeds
  cfg.update(_cfg(files))
  packed = pipeline.build(cfg, tok, seq_len=64).stats()
  unpacked = pipeline.build(_cfg(files, packing=False), tok, seq_len=64)
  b = next(unpacked.batches(8))
  assert (b["segment_ids"].max(axis=1) == 1).all()
  assert unpacked.stats()["epoch_rows"] == 42
  assert unpacked.stats()["packing_efficiency"] < packed["packing_efficiency"]


def test_per_dataset_system_prompts_and_templates(tok, files):
  cfg = _cfg(files, datasets=[
      dict(path=files["chat"], system_prompt="Be brief.", name="general"),
      dict(path=files["chat"], name="domain", system_prompt="You are a billing agent.",
           template=dict(user="【USER】：{content}\n", assistant="【BOT】：{content}{eos}"))])
  pipe = pipeline.build(cfg, tok, seq_len=96)
  texts = {name: [tok.decode(ex.input_ids) for ex in
                  (pipe.example(g)[1] for g in range(len(pipe.train)) if
                   pipe.example(g)[0] == name)] for name in ("general", "domain")}
  assert all(t.startswith("<|im_start|>system\nBe brief.<|im_end|>") for t in texts["general"])
  assert all(t.startswith("<s>【USER】：You are a billing agent.\n\nWhy") for t in texts["domain"])


def test_weights_and_epochs_in_the_stream(tok, files, tmp_path):
  other = _write(tmp_path / "other.jsonl", _alpaca(30, "JAX is fast", start=100))
  cfg = _cfg(files, datasets=[dict(path=files["chat"], weight=3.0),
                              dict(path=other, weight=1.0), dict(path=files["text"], epochs=2)])
  pipe = pipeline.build(cfg, tok, seq_len=64)
  assert pipe.mixture.counts == [45, 15, 24]
  per = {d["name"]: d["epoch_examples"] for d in pipe.stats()["datasets"]}
  assert per == {"chat": 45, "other": 15, "text": 24}
  segs = collections.Counter(s for b in pipe.batches(4, epochs=1) for s in _segments(b))
  text = collections.Counter(_expected(tok, {"path": files["text"]}))
  assert all(segs[k] == 2 * v for k, v in text.items())


@pytest.mark.parametrize("stop_at", [3, 9])
def test_resumed_batches_equal_uninterrupted_ones(tok, files, stop_at):
  cfg = _cfg(files)
  pipe = pipeline.build(cfg, tok, seq_len=64, seed=3)
  rows = pipe.rows_per_epoch(0)
  it = pipe.batches(5)
  want = [next(it) for _ in range(16)]
  assert 16 * 5 > 2 * rows  # crosses two epoch boundaries
  first = pipe.batches(5)
  for _ in range(stop_at):
    next(first)
  state = json.loads(json.dumps(first.state()))  # as a checkpoint stores it
  assert pipe.state() == state
  fresh = pipeline.build(cfg, tok, seq_len=64, seed=3)  # a new process, from the cache
  resumed = fresh.batches(5, state=state)
  for k in range(stop_at, 16):
    got = next(resumed)
    for f in want[k]:
      np.testing.assert_array_equal(got[f], want[k][f], err_msg=f"batch {k} {f}")


def test_process_slices_make_up_the_global_batch(tok, files):
  pipe = pipeline.build(_cfg(files), tok, seq_len=64)
  whole = next(pipe.batches(4))
  parts = [next(pipe.batches(4, process_index=i, process_count=2)) for i in range(2)]
  for f in whole:
    np.testing.assert_array_equal(np.concatenate([p[f] for p in parts]), whole[f])
  with pytest.raises(ValueError, match="batch_size=3 does not divide over 2 processes"):
    pipe.batches(3, process_count=2)


def test_max_samples_reads_the_first_rows_of_each_dataset(tok, files, tmp_path):
  """data.max_samples (LLaMA-Factory's) keeps each dataset's first N rows; a
  dataset's own max_samples wins; eval datasets are cut too."""
  held = _write(tmp_path / "held.jsonl", _alpaca(9, "lazy dog", start=500))
  cfg = _cfg(files, max_samples=10, eval_datasets=[held])
  cfg["datasets"] = [dict(path=files["chat"], max_samples=4), dict(path=files["text"])]
  pipe = pipeline.build(cfg, tok, seq_len=64)
  got = collections.Counter(s for b in pipe.batches(4, epochs=1) for s in _segments(b))
  first = lambda path, n: _expected(tok, {"path": path})[:n]  # noqa: E731
  assert got == collections.Counter(first(files["chat"], 4) + first(files["text"], 10))
  evals = collections.Counter(s for b in pipe.eval_batches(4) for s in _segments(b))
  assert evals == collections.Counter(first(held, 9))  # fewer rows than max_samples
  with pytest.raises(ValueError, match=r"max_samples must be an integer >= 1, got 0"):
    pipeline.build(dict(cfg, datasets=[dict(path=files["chat"], max_samples=0)]), tok, 64)


def test_eval_split_and_eval_datasets(tok, files, tmp_path):
  held = _write(tmp_path / "held.jsonl", _alpaca(5, "lazy dog", start=500))
  pipe = pipeline.build(_cfg(files, eval_fraction=0.2, eval_datasets=[held]), tok, seq_len=64)
  stats = pipe.stats()
  assert [d["eval_examples"] for d in stats["datasets"]] == [6, 2]
  assert stats["eval_examples"] == 6 + 2 + 5 and stats["epoch_examples"] == 42 - 8
  train = collections.Counter(s for b in pipe.batches(4, epochs=1) for s in _segments(b))
  evals = collections.Counter(s for b in pipe.eval_batches(4) for s in _segments(b))
  assert sum(evals.values()) == 13 and sum(train.values()) == 34
  all_examples = collections.Counter(_expected(tok, {"path": files["chat"]})
                                     + _expected(tok, {"path": files["text"]})
                                     + _expected(tok, {"path": held}))
  assert train + evals == all_examples
  assert list(pipeline.build(_cfg(files), tok, 64).eval_batches(4)) == []
  # Each eval dataset on its own: its examples, and together all of them.
  names = pipe.eval_names()
  assert names == ["chat", "text", "held"]
  each = {n: collections.Counter(s for b in pipe.eval_batches(4, dataset=n) for s in _segments(b))
          for n in names}
  assert each["held"] == collections.Counter(_expected(tok, {"path": held}))
  assert [sum(c.values()) for c in each.values()] == [6, 2, 5]
  assert sum(each.values(), collections.Counter()) == evals
  with pytest.raises(ValueError, match="no eval dataset named 'nope'; eval datasets: "):
    next(pipe.eval_batches(4, dataset="nope"))


def test_tokenized_cache_is_reused_and_keyed_by_content(tok, files, monkeypatch):
  cfg = _cfg(files, datasets=[dict(path=files["chat"])])
  first = pipeline.build(cfg, tok, seq_len=40)  # drops the longest answers
  assert first.stats()["dropped_too_long"] > 0
  batch = next(first.batches(4))

  def fail(*a, **k):
    raise AssertionError("tokenized again")

  monkeypatch.setattr(pipeline, "_encode_batch", fail)
  again = pipeline.build(cfg, tok, seq_len=40)
  assert again.stats() == first.stats()  # the counts come back with the tokens
  for f in batch:
    np.testing.assert_array_equal(next(again.batches(4))[f], batch[f])
  with pytest.raises(AssertionError, match="tokenized again"):
    pipeline.build(cfg, tok, seq_len=48)  # another max_length
  with pytest.raises(AssertionError, match="tokenized again"):
    pipeline.build({**cfg, "train_on": "last_assistant"}, tok, seq_len=40)
  with open(files["chat"], "a") as f:
    f.write(json.dumps({"instruction": "New?", "output": "Yes"}) + "\n")
  with pytest.raises(AssertionError, match="tokenized again"):
    pipeline.build(cfg, tok, seq_len=40)


def test_multiprocess_tokenization_gives_the_same_tokens(tok, files, tmp_path):
  cfg = _cfg(files, datasets=[dict(path=files["chat"])])
  one = pipeline.build(cfg, tok, seq_len=64)
  two = pipeline.build({**cfg, "num_proc": 2, "cache_dir": str(tmp_path / "c2")}, tok, seq_len=64)
  a, b = one.datasets[0], two.datasets[0]
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
  assert [a.source(k) for k in range(len(a))] == [b.source(k) for k in range(len(b))]


def test_text_only_stage_needs_no_chat_template(files):
  tok = hf_builders.build_tokenizer()
  tok.chat_template = None  # a base model's tokenizer
  pipe = pipeline.build(_cfg(files, datasets=[files["text"]], template="tokenizer"), tok, 64)
  assert pipe.stats()["kept"] == 12
  with pytest.raises(ValueError, match="the tokenizer has no chat_template"):
    pipeline.build(_cfg(files, datasets=[files["chat"]], template="tokenizer"), tok, 64)


@pytest.mark.parametrize("change, seq_len, message", [
    (dict(datasets=[]), 64, "data.datasets is empty"),
    (dict(datsets=[]), 64, r"data: unknown keys \['datsets'\]"),
    (dict(max_length=80), 64, "data.max_length=80 is longer than seq_len=64"),
    (dict(truncation="cut"), 64, "data.truncation 'cut' is not one of"),
    (dict(eval_fraction=1.0), 64, r"data.eval_fraction must be a number in \[0, 1\)"),
    (dict(packing="yes"), 64, "data.packing must be True or False"),
    (dict(num_proc=0), 64, "data.num_proc must be an integer >= 1"),
    (dict(eval_datasets=[dict(path="x.jsonl", weight=2)]), 64, "weight does not apply"),
])
def test_bad_configs(tok, files, change, seq_len, message):
  with pytest.raises(ValueError, match=message):
    pipeline.build(_cfg(files, **change), tok, seq_len=seq_len)


def test_bad_dataset_entries(tok, files, tmp_path):
  def build(datasets, seq_len=64, **kw):
    return pipeline.build(_cfg(files, datasets=datasets, **kw), tok, seq_len=seq_len)

  with pytest.raises(ValueError, match=r"data.datasets\[1\] .*unknown keys \['weigth'\]"):
    build([files["chat"], dict(path=files["text"], weigth=2)])
  with pytest.raises(ValueError, match="dataset 'text': weight=0 must be a positive number"):
    build([dict(path=files["chat"], weight=1), dict(path=files["text"], weight=0)])
  with pytest.raises(ValueError, match="dataset 'chat': weight=-2 must be a positive number"):
    build([dict(path=files["chat"], weight=-2)])
  # seq_len below the shortest example, truncation=drop: everything dropped.
  with pytest.raises(ValueError, match=(r"dataset 'chat' \(.*chat.jsonl:1 …\): all 30 examples "
                                        r"were dropped: all are longer than max_length=12 tokens; "
                                        r"raise seq_len .* truncation='keep_answer'")):
    build([files["chat"]], seq_len=12)
  # Prompt tuning's virtual tokens take their share of every row: the limit says so.
  with pytest.raises(ValueError, match=(r"all are longer than 12 tokens \(seq_len 64 minus 52 "
                                        r"virtual tokens of prompt tuning\)")):
    pipeline.build(_cfg(files, datasets=[files["chat"]]), tok, seq_len=64, virtual_tokens=52)
  no_answer = _write(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
  with pytest.raises(ValueError, match="'q' .* none has an assistant turn"):
    build([no_answer])
  pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}])
  with pytest.raises(ValueError, match="pairs.jsonl:1: a pairwise row .* reward model"):
    build([pairs])
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
    build([str(bad)])
  with pytest.raises(ValueError, match="no such file or directory"):
    build(["./missing.jsonl"])
  pipe = build([files["chat"]])
  for state in ({"epoch": 0, "row": 10**6}, {"row": 0}):
    with pytest.raises(ValueError, match="data state"):
      pipe.batches(4, state=state)


def test_truncation_keep_answer_is_counted(tok, files):
  pipe = pipeline.build(_cfg(files, datasets=[files["chat"]], truncation="keep_answer"), tok, 40)
  stats = pipe.stats()
  assert stats["truncated"] > 0 and stats["kept"] + stats["dropped_too_long"] == 30
  assert max(len(pipe.example(g)[1].input_ids) for g in range(len(pipe.train))) <= 40


# ----------------------------------------------------------------------------- report and CLI

def test_duplicate_and_diversity_figures():
  base = " ".join(f"word{i}" for i in range(60))
  texts = [base, base.replace("word30", "other"), "  " + base + " ", "completely different text",
           " ".join(f"x{i}" for i in range(60))]
  exact = report._exact_mask(texts)
  assert exact.tolist() == [False, False, True, False, False]
  near = report.near_duplicates(report.minhash(texts), exclude=exact)
  assert near.tolist() == [False, True, False, False, False]
  assert report.distinct_n(["a b a", "a c"], 1) == pytest.approx(3 / 5)
  assert report.distinct_n(["a b a", "a c"], 2) == pytest.approx(3 / 3)
  assert report.distinct_n([], 2) is None
  assert report.words("今天 is Fine!") == ["今", "天", "is", "fine"]


def test_render_marks_trained_tokens(tok):
  ids = tok("Hi there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  mask = [0] * (len(ids) - 1) + [1]
  assert report.render(tok, ids, mask) == "Hi there[[</s>]]"
  assert report.render(tok, ids, mask, color=True) == f"Hi there{report.GREEN}</s>{report.RESET}"


def _config_file(tmp_path, files, tokenizer_dir, seq_len=64):
  path = tmp_path / "inspect.py"
  path.write_text(textwrap.dedent(f"""
      import ml_collections

      def get_config():
        return ml_collections.ConfigDict(dict(
            tokenizer={str(tokenizer_dir)!r}, seed=0,
            stages=[dict(name="cpt", seq_len={seq_len}, data=dict(
                         datasets=[dict(path={files['text']!r})], cache_dir={files['cache']!r})),
                    dict(name="sft", seq_len={seq_len}, data=dict(
                         datasets=[dict(path={files['chat']!r}, weight=3.0),
                                   dict(path={files['text']!r}, weight=1.0)],
                         template="chatml", cache_dir={files['cache']!r}))]))
      """))
  return str(path)


def test_cli_prints_examples_then_one_json_line(tmp_path, files, tokenizer_dir):
  config = _config_file(tmp_path, files, tokenizer_dir)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  cmd = [sys.executable, "-m", "jaxsft.data", f"--config={config}", "--stage=sft", "--show=2",
         "--config.stages[1].seq_len=48"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  figures = json.loads(lines[-1])
  assert figures["stage"] == "sft" and figures["examples"] == 42
  assert figures["dropped_too_long"] > 0  # the override took: seq_len 48 drops long answers
  assert sum(line.startswith("--- example") for line in lines) == 2
  assert "[[" in out.stdout and "\033[" not in out.stdout
  for key in ("tokens", "trained_tokens", "truncated", "packing_efficiency", "exact_duplicates",
              "near_duplicates", "distinct_1", "distinct_2", "length_p50", "length_p90",
              "length_p99"):
    assert key in figures

  bad = subprocess.run(cmd[:-1] + ["--stage=nope"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == ("error: --stage 'nope': no such stage; the "
                                                 "stages are ['cpt', 'sft']")


def test_report_scores_answers_with_a_model(tmp_path, files, hf_model_factory, tokenizer_dir):
  import ml_collections
  import torch

  model_dir, torch_model = hf_model_factory("llama")
  dup = _write(tmp_path / "dup.jsonl", _alpaca(4) + _alpaca(2))  # rows 5, 6 repeat rows 1, 2
  config = ml_collections.ConfigDict(dict(tokenizer=str(tokenizer_dir), stages=[dict(
      name="sft", seq_len=64, data=dict(datasets=[dup], template="chatml",
                                        cache_dir=files["cache"]))]))
  out = tmp_path / "out.txt"
  with open(out, "w") as f:
    figures = cli.run(config, show=1, score_with=str(model_dir), top=2, out=f)
  assert figures["exact_duplicates"] == 2
  assert len(figures["worst"]) == len(figures["most_trivial"]) == 2
  assert figures["worst"][0]["loss"] >= figures["most_trivial"][0]["loss"]
  assert "highest answer loss:" in out.read_text()

  # Each score is the example's masked loss under transformers, -100 labels.
  pipe = pipeline.build(config.stages[0]["data"], hf_builders.build_tokenizer(), 64)
  scores = report.score(pipe, str(model_dir))
  assert scores[0]["loss"] == pytest.approx(scores[4]["loss"], rel=1e-6)
  ids, mask = pipe.datasets[0].example(0)
  labels = np.where(mask == 1, ids, -100)
  with torch.no_grad():
    ref = torch_model(input_ids=torch.tensor([ids.tolist()]),
                      labels=torch.tensor([labels.tolist()])).loss.item()
  assert scores[0]["loss"] == pytest.approx(ref, rel=1e-5)
  assert scores[0]["source"].endswith("dup.jsonl:1")
  # A jaxsft checkpoint of the same weights (saved without a tokenizer: the
  # data's is used) scores the same; a model with a score head is refused.
  from jaxsft import checkpoint, hf
  cfg, params = hf.load_params(model_dir)
  ckpt = checkpoint.save_model(tmp_path / "ckpt", params, cfg)
  assert report.score(pipe, str(ckpt)) == scores
  import jax
  from jaxsft.models import heads
  head_cfg = heads.head_config(cfg, "cls", ["a", "b"], False, cfg.pad_token_id)
  head = checkpoint.save_model(tmp_path / "head", heads.attach(
      cfg, params, head_cfg, jax.random.key(0), None), head_cfg)
  with pytest.raises(ValueError, match="has a score head and no lm_head"):
    report.score(pipe, str(head))


def test_report_without_a_tokenizer_is_a_clear_error(files):
  import ml_collections

  config = ml_collections.ConfigDict(dict(stages=[dict(name="s", seq_len=64, data=_cfg(files))]))
  with pytest.raises(ValueError, match="the config names no tokenizer"):
    cli.run(config)


def test_conversation_order_for_reports(tok, files):
  pipe = pipeline.build(_cfg(files, datasets=[files["chat"]]), tok, 40)
  convs = report.kept_conversations(pipe)
  assert len(convs) == pipe.stats()["kept"]
  name, k, conv = convs[0]
  ids, _ = pipe.datasets[0].example(k)
  t = get_template("chatml", tok)
  assert encode(conv, t, tok).input_ids == ids.tolist()
  assert isinstance(conv, Conversation) and conv.messages[0] == Message("user", "Why 0?")


def test_labelled_rows_train_the_json_answer(tok, tmp_path):
  path = _write(tmp_path / "intents.jsonl", [{"text": "Refund my invoice", "labels": ["refund"]},
                                             {"text": "Hi", "label": 0}])
  pipe = pipeline.build(dict(datasets=[path], template="chatml", cache_dir=str(tmp_path / "c")),
                        tok, seq_len=64)
  name, ex = pipe.example(0)  # the first row of the file
  trained = tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if m])
  assert name == "intents" and trained == '{"labels": ["refund"]}<|im_end|>'
