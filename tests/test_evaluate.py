"""Loss evaluation against transformers' own loss, and the CLI's input errors."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from jaxsft import evaluate
from jaxsft import hf

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "用户：你好，请问今天的天气怎么样？",
    "def add(a, b):\n    return a + b\n",
    "Fine-tuning language models with JAX is fast and correct. " * 3,
    "Intent",
]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  return path


def _hf_mean_loss(model, tokenizer, texts):
  """Token-weighted mean over rows of transformers' per-row mean loss."""
  total, count = 0.0, 0
  for text in texts:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
      loss = model(ids, labels=ids).loss.item()
    total += loss * (ids.shape[1] - 1)
    count += ids.shape[1] - 1
  return total / count, count


def test_cli_loss_matches_transformers(hf_model_factory, tmp_path):
  d, model = hf_model_factory("llama")
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  want, count = _hf_mean_loss(model, tokenizer, TEXTS)
  data = _write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in TEXTS])
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  # Batch size 2 with 5 rows: padded rows, and a last batch with an empty slot.
  result = subprocess.run(
      [sys.executable, "-m", "jaxsft.evaluate", "--model", str(d), "--data", str(data),
       "--format", "text", "--batch-size", "2"],
      capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr
  metrics = json.loads(result.stdout.strip().splitlines()[-1])
  assert metrics["tokens"] == count
  assert abs(metrics["loss"] - want) < 1e-5, (metrics, want)


@pytest.mark.parametrize("variant", ["mistral", "mixtral"])
def test_token_loss_matches_transformers(hf_model_factory, variant):
  # mistral: rows longer than the sliding window; mixtral: padding must not
  # change the routing of real tokens.
  d, model = hf_model_factory(variant)
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  cfg, params = hf.load_params(d)
  rows = [tokenizer(t)["input_ids"] for t in TEXTS]
  want, count = _hf_mean_loss(model, tokenizer, TEXTS)
  total, n = evaluate.token_loss(cfg, params, rows, batch_size=4)
  assert n == count
  np.testing.assert_allclose(total / n, want, atol=1e-5)


def test_max_length_truncates(hf_model_factory, tmp_path, capsys):
  d, model = hf_model_factory("llama")
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  cfg, params = hf.load_params(d)
  rows = [tokenizer(t)["input_ids"][:6] for t in TEXTS]
  want, _ = evaluate.token_loss(cfg, params, rows)
  data = _write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in TEXTS])
  assert evaluate.main(["--model", str(d), "--data", str(data), "--max-length", "6"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  metrics = json.loads(out[-1])
  assert metrics["tokens"] == sum(len(r) - 1 for r in rows)
  assert len(rows[0]) == 6 and len(rows[-1]) < 6  # truncated, and short rows kept whole
  np.testing.assert_allclose(metrics["loss"], want / metrics["tokens"], rtol=1e-6)


def test_cli_errors_name_file_and_line(hf_model_factory, tmp_path, capsys):
  d, _ = hf_model_factory("llama")

  # main()'s return value is the exit status (``sys.exit(main())``).
  def error(data, *extra):
    assert evaluate.main(["--model", str(d), "--data", str(data), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err

  missing = tmp_path / "missing.jsonl"
  assert f"data file {missing} does not exist" in error(missing)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n  \n")
  assert f"data file {empty} has no rows" in error(empty)

  malformed = tmp_path / "malformed.jsonl"
  malformed.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
  assert f"{malformed}:3: not valid JSON" in error(malformed)
  no_text = _write_jsonl(tmp_path / "no_text.jsonl", [{"text": "a"}, {"prompt": "b"}])
  assert f'{no_text}:2: no "text" key' in error(no_text)
  not_str = _write_jsonl(tmp_path / "not_str.jsonl", [{"text": ["a"]}])
  assert f'{not_str}:1: "text" must be a string' in error(not_str)
  not_obj = _write_jsonl(tmp_path / "not_obj.jsonl", [["a"]])
  assert f"{not_obj}:1: expected a JSON object" in error(not_obj)

  too_long = _write_jsonl(tmp_path / "long.jsonl",
                          [{"text": "short"}, {"text": "The quick brown fox. " * 100}])
  err = error(too_long)
  assert f"{too_long}:2: the row is" in err and "--max-length 256" in err
  ok = _write_jsonl(tmp_path / "ok.jsonl", [{"text": "short"}])
  assert "--max-length=1000 exceeds" in error(ok, "--max-length", "1000")
  assert "--format 'bogus' is not supported" in error(ok, "--format", "bogus")
  assert "nothing to predict" in error(_write_jsonl(tmp_path / "one.jsonl", [{"text": ""}]))
  assert f"data file {tmp_path} is a directory" in error(tmp_path)
  err = error(ok, "--format", "messages")
  assert "missing field 'messages'" in err and "give the --format the rows are in" in err, err
  assert "columns=" not in err, err
  capsys.readouterr()
  with_empty = _write_jsonl(tmp_path / "with_empty.jsonl", [{"text": "short"}, {"text": ""}])
  assert evaluate.main(["--model", str(d), "--data", str(with_empty)]) == 0
  out = capsys.readouterr().out
  assert "2 rows" in out and "1 of the rows score nothing" in out, out
  # Checked before the model loads, not after the evaluation has run.
  assert f"--predictions {tmp_path} must be a file path" in error(
      ok, "--metric", "json-labels", "--format", "auto", "--predictions", str(tmp_path))


def test_a_model_with_nan_weights_is_an_error_naming_them(hf_model_factory, tmp_path, capsys):
  src, shared = hf_model_factory("llama")
  model = copy.deepcopy(shared)  # the factory's model is shared with other tests
  with torch.no_grad():
    model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
  model.save_pretrained(tmp_path / "nan")
  transformers.AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path / "nan")
  data = _write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in TEXTS])
  assert evaluate.main(["--model", str(tmp_path / "nan"), "--data", str(data)]) == 2
  err = capsys.readouterr().err
  assert "the loss is nan" in err and "NaN or infinity in layers/mlp/up_df" in err, err


# ----------------------------------------------------------------------------- JSON labels

def test_extract_json_finds_the_first_object_that_parses():
  obj = {"domain": "billing", "intents": ["refund", "invoice_copy"], "note": "a } in {text}"}
  text = json.dumps(obj)
  assert evaluate.extract_json(text) == obj
  assert evaluate.extract_json(f"Sure! Here it is: {text} Hope that helps.") == obj
  assert evaluate.extract_json(f"```json\n{text}\n```") == obj
  # A brace-balanced but invalid candidate first: the next object is taken.
  assert evaluate.extract_json(f"{{labels: refund}} then {text}") == obj
  nested = {"a": {"b": [1, 2], "c": {"d": "x"}}}
  assert evaluate.extract_json("x " + json.dumps(nested)) == nested
  for bad in ("no json here", "[1, 2]", '{"open": ', ""):
    assert evaluate.extract_json(bad) is None


def _reference_scores(preds, refs):
  """exact match and F1 from sets of (example, field=label) pairs, computed
  independently of evaluate.compare."""
  def flat(obj, prefix=""):
    out = {}
    for k, v in obj.items():
      path = f"{prefix}.{k}" if prefix else k
      out.update(flat(v, path) if isinstance(v, dict) else
                 {path: frozenset(v if isinstance(v, list) else [v])})
    return out
  P = {(i, f"{k}={l}") for i, p in enumerate(preds) if p is not None
       for k, ls in flat(p).items() for l in ls}
  R = {(i, f"{k}={l}") for i, r in enumerate(refs) for k, ls in flat(r).items() for l in ls}
  tp, fp, fn = len(P & R), len(P - R), len(R - P)
  labels = {l for _, l in P | R}
  def f1(l):
    a = {x for x in P if x[1] == l}
    b = {x for x in R if x[1] == l}
    return 2 * len(a & b) / (len(a) + len(b))
  exact = [p is not None and flat(p) == flat(r) for p, r in zip(preds, refs)]
  return {"exact_match": sum(exact) / len(refs), "micro_f1": 2 * tp / (2 * tp + fp + fn),
          "macro_f1": sum(f1(l) for l in labels) / len(labels)}


def test_field_by_field_comparison_of_nested_multi_label_answers():
  refs = [{"domain": "billing", "intents": ["refund", "invoice_copy"], "meta": {"priority": "high"}},
          {"domain": "orders", "intents": ["track_order"], "meta": {"priority": "normal"}},
          {"domain": "account", "intents": ["reset_password"], "meta": {"priority": "normal"}},
          {"domain": "technical", "intents": ["roaming", "slow_data"], "meta": {"priority": "high"}}]
  preds = [{"domain": "billing", "intents": ["invoice_copy", "refund"], "meta": {"priority": "high"}},
           {"domain": "orders", "intents": ["track_order", "cancel_order"],
            "meta": {"priority": "normal"}},
           None,  # a parse failure
           {"domain": "technical", "intents": ["roaming"]}]  # a field missing
  comparisons = [evaluate.compare(p, r) for p, r in zip(preds, refs)]
  summary = evaluate.summarize(comparisons, parse_failures=1)
  want = _reference_scores(preds, refs)
  for key in want:
    assert summary[key] == pytest.approx(want[key]), key
  assert [c.exact for c in comparisons] == [True, False, False, False]
  assert summary["per_field_accuracy"] == {"domain": 3 / 4, "intents": 1 / 4,
                                           "meta.priority": 2 / 4}
  assert summary["parse_failure_rate"] == 1 / 4 and summary["examples"] == 4
  known = evaluate.known_labels(refs[:2])
  assert evaluate.unseen_labels(refs[2:], known) == {
      "domain=account": 1, "domain=technical": 1, "intents=reset_password": 1,
      "intents=roaming": 1, "intents=slow_data": 1}


INTENT_ROWS = [("Refund my bill please", {"domain": "billing", "intents": ["refund"]}),
               ("Where is my order?", {"domain": "orders", "intents": ["track_order"]}),
               ("Reset my password and refund me", {"domain": "account",
                                                     "intents": ["reset_password", "refund"]}),
               ("Hi", {"domain": "billing", "intents": ["invoice_copy"]}),
               ("The quick brown fox jumps over the lazy dog.", {"domain": "orders",
                                                                 "intents": ["roaming"]})]


def _chat_rows(rows):
  return [{"messages": [{"role": "user", "content": text},
                        {"role": "assistant", "content": json.dumps(ref)}]} for text, ref in rows]


def test_json_labels_cli_generates_what_transformers_generates(hf_model_factory, tmp_path,
                                                                capsys):
  # qwen2: this tiny random model's answers differ from prompt to prompt.
  d, model = hf_model_factory("qwen2")
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  data = _write_jsonl(tmp_path / "eval.jsonl", _chat_rows(INTENT_ROWS))
  train = _write_jsonl(tmp_path / "train.jsonl", _chat_rows(INTENT_ROWS[:2]))
  system = "Label."

  def run(batch_size, preds):
    argv = ["--model", str(d), "--data", str(data), "--metric", "json-labels", "--chat",
            "--system", system, "--batch-size", str(batch_size), "--max-new-tokens", "10",
            "--predictions", str(preds), "--train-data", str(train)]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1]), [json.loads(l) for l in preds.read_text().splitlines()]

  summary, records = run(3, tmp_path / "p3.jsonl")
  assert len({r["generation"] for r in records}) > 2
  # Batched (3 per batch, sorted by length, padded) equals one by one.
  summary1, records1 = run(1, tmp_path / "p1.jsonl")
  assert records1 == records and summary1 == summary
  # transformers' greedy decoding of the same chat prompts, stopping at the same ids.
  stop = sorted({2} | {tokenizer.convert_tokens_to_ids("<|im_end|>")})
  texts = []
  for text, _ in INTENT_ROWS:
    ids = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                         {"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
      out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                           dtype=torch.long), do_sample=False, max_new_tokens=10,
                           eos_token_id=stop, pad_token_id=0)
    texts.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
  assert [r["generation"] for r in records] == texts
  preds = [evaluate.extract_json(t) for t in texts]
  assert summary["parse_failure_rate"] == sum(p is None for p in preds) / len(preds)
  assert summary["examples"] == 5
  assert summary["exact_match"] == _reference_scores(preds, [r for _, r in INTENT_ROWS])[
      "exact_match"]
  assert summary["unseen_labels"]["intents=reset_password"] == 1
  assert [r["reference"] for r in records] == [r for _, r in INTENT_ROWS]


def test_answer_only_loss_matches_transformers(hf_model_factory, tmp_path, capsys):
  d, model = hf_model_factory("llama")
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  data = _write_jsonl(tmp_path / "sft.jsonl", _chat_rows(INTENT_ROWS))
  assert evaluate.main(["--model", str(d), "--data", str(data), "--metric", "loss",
                        "--format", "messages", "--batch-size", "2"]) == 0
  metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # Reference: the answer tokens (up to and including <|im_end|>) of the chat
  # template's rendering, scored by transformers with every other label -100.
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  total, count = 0.0, 0
  for row in _chat_rows(INTENT_ROWS):
    msgs = row["messages"]
    prompt = tokenizer.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    end = full.index(im_end, len(prompt)) + 1
    labels = [-100] * len(full)
    labels[len(prompt):end] = full[len(prompt):end]
    with torch.no_grad():
      loss = model(torch.tensor([full]), labels=torch.tensor([labels])).loss.item()
    total += loss * (end - len(prompt))
    count += end - len(prompt)
  assert metrics["tokens"] == count
  np.testing.assert_allclose(metrics["loss"], total / count, rtol=1e-5)


def test_accuracy_of_a_classifier_matches_transformers(hf_model_factory, tmp_path, capsys):
  import jax
  from jaxsft.models import heads
  d, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(d)
  head_cfg = heads.head_config(cfg, "cls", ("billing", "orders", "account"))
  params = heads.attach(cfg, params, head_cfg, jax.random.key(0))
  params["score"]["kernel_dc"] = jax.random.normal(jax.random.key(1), (64, 3))
  out = hf.save_params(params, head_cfg, tmp_path / "cls", tokenizer_src=d)
  rows = [{"text": t, "label": r["domain"]} for t, r in INTENT_ROWS]
  rows.append({"text": "A zebra", "label": "zebra"})  # a label the model does not have
  data = _write_jsonl(tmp_path / "labels.jsonl", rows)
  assert evaluate.main(["--model", str(out), "--data", str(data), "--metric", "accuracy",
                        "--batch-size", "4", "--predictions", str(tmp_path / "p.jsonl")]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  right = 0
  for row in rows:
    with torch.no_grad():
      logits = model(torch.tensor([tokenizer(row["text"])["input_ids"]])).logits[0]
    right += model.config.id2label[int(logits.argmax())] == row["label"]
  assert summary["accuracy"] == summary["exact_match"] == right / len(rows)
  assert summary["unseen_labels"] == {"labels=zebra": 1} and summary["examples"] == 6
  assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 6


def test_label_metrics_bad_input(hf_model_factory, tmp_path, capsys):
  d, _ = hf_model_factory("llama")

  def error(*argv):
    assert evaluate.main(["--model", str(d), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err

  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  assert f"{empty}: no rows (the file is empty)" in error("--data", str(empty), "--metric",
                                                          "json-labels")
  not_json = _write_jsonl(tmp_path / "nj.jsonl", [{"messages": [
      {"role": "user", "content": "hi"}, {"role": "assistant", "content": "billing"}]}])
  assert f"{not_json}:1: the reference answer is not a JSON object" in error(
      "--data", str(not_json), "--metric", "json-labels")
  labels = _write_jsonl(tmp_path / "l.jsonl", [{"text": "hi", "label": "a"}])
  assert "--metric accuracy needs a classification model" in error(
      "--data", str(labels), "--metric", "accuracy")
  assert "--metric 'f1' is not one of" in error("--data", str(labels), "--metric", "f1")
  assert "--system needs --chat" in error("--data", str(labels), "--metric", "json-labels",
                                          "--system", "x")


# ----------------------------------------------------------------------------- inside a stage

def test_generation_eval_inside_a_stage(tmp_path):
  import train_fixtures
  from jaxsft import checkpoint, config as config_lib, trainer
  from jaxsft.data import templates
  c = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", sft_steps=4)
  del c.stages["cpt"]
  data = _write_jsonl(tmp_path / "intent.jsonl", _chat_rows(INTENT_ROWS))
  c.stages.sft.generate_eval = dict(every=2, path=str(data), system_prompt="Label.",
                                    examples=4, max_new_tokens=8, batch_size=2)
  out = trainer.train(c)
  rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  generated = [r for r in rows if r["split"] == "generate"]
  assert [r["step"] for r in generated] == [2, 4]
  assert (out / "loss.png").is_file()
  # The last row is what evaluate computes on the stage's final model.
  cfg, params = checkpoint.load_model(out / "stages" / "sft" / "final")
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "data" / "tokenizer")
  examples = evaluate.json_examples(evaluate.read_examples(data, system="Label."))[:4]
  summary, records = evaluate.json_label_eval(cfg, params, tokenizer, examples,
                                              template=templates.get_template("chatml", tokenizer),
                                              max_new_tokens=8, batch_size=2)
  assert {k: generated[-1][k] for k in summary} == summary
  # ... and each evaluation's answers are kept beside the stage, one file per step.
  assert generated[-1]["predictions"] == "stages/sft/generations/step_4.jsonl"
  written = [json.loads(l) for l in (out / generated[-1]["predictions"]).read_text().splitlines()]
  assert written == json.loads(json.dumps(records))
  assert (out / "stages" / "sft" / "generations" / "step_2.jsonl").is_file()

  bad = config_lib.stage(objective="cls", data=dict(datasets=[str(data)]),
                         generate_eval=dict(every=5, path=str(data)))
  with pytest.raises(ValueError, match="generate_eval: a cls stage trains a head"):
    config_lib.validate_stage("head", bad)
  nopath = config_lib.stage(data=dict(datasets=[str(data)]), generate_eval=dict(every=5))
  with pytest.raises(ValueError, match=r"stages.s.generate_eval.path: set the file"):
    config_lib.validate_stage("s", nopath)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_loss_of_a_prompt_tuned_checkpoint_matches_peft(hf_model_factory, tmp_path, capsys,
                                                        method):
  # The CLI reads every row after the virtual tokens (prompt tuning) or with
  # the prefixes (prefix tuning), as PEFT's model computes its loss.
  import jax
  import peft
  from jaxsft import checkpoint, config as config_lib, export
  from jaxsft.peft import methods
  d, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(d)
  stage = config_lib.stage(method=method, peft=dict(virtual_tokens=4))
  cfg, params = methods.prepare(cfg, params, stage, jax.random.key(0))
  top = "prompt" if method == "prompt" else "prefix"
  rng = np.random.default_rng(2)
  params[top] = jax.tree_util.tree_map(
      lambda x: (0.5 * rng.standard_normal(x.shape)).astype(np.float32), params[top])
  ckpt = tmp_path / "ckpt"
  checkpoint.save_model(ckpt, params, cfg, tokenizer_src=d)
  data = _write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS[:3]])
  assert evaluate.main(["--model", str(ckpt), "--data", str(data), "--batch-size", "2"]) == 0
  metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

  adapter = export.export(ckpt, tmp_path / "adapter", peft=True, base_model=str(d))
  model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(d), adapter).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  total, count = 0.0, 0
  for text in TEXTS[:3]:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
      loss = model(input_ids=ids, labels=ids).loss.item()
    # After virtual tokens the first token is predicted too (PEFT's labels).
    n = ids.shape[1] - (method == "prefix")
    total, count = total + loss * n, count + n
  assert metrics["tokens"] == count
  np.testing.assert_allclose(metrics["loss"], total / count, rtol=1e-5)


def test_accuracy_of_a_prompt_tuned_classifier_matches_peft(hf_model_factory, tmp_path):
  # A prompt-tuned head model scores each text after its virtual tokens, as
  # PEFT's SEQ_CLS prompt tuning does (one row at a time: no padding).
  import jax
  import peft
  from jaxsft import config as config_lib
  from jaxsft.models import heads
  from jaxsft.peft import export as peft_export, methods
  d, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(d)
  head_cfg = heads.head_config(cfg, "cls", ("billing", "orders", "account"))
  params = heads.attach(cfg, params, head_cfg, jax.random.key(0))
  params["score"]["kernel_dc"] = jax.random.normal(jax.random.key(1), (64, 3))
  stage = config_lib.stage(objective="cls", method="prompt", peft=dict(virtual_tokens=4))
  cfg, params = methods.prepare(head_cfg, params, stage, jax.random.key(2))
  params["prompt"] = jax.tree_util.tree_map(
      lambda x: 0.5 * jax.random.normal(jax.random.key(3), x.shape), params["prompt"])
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  rows = [tokenizer(t)["input_ids"] for t in TEXTS]
  ours = evaluate.classifier_logits(cfg, params, rows, batch_size=2)

  base_dir = hf.save_params(methods.base_params(params), head_cfg, tmp_path / "base")
  table = peft_export.prompt_tensors(cfg, params)["prompt_embeddings"]
  model = peft.get_peft_model(
      transformers.AutoModelForSequenceClassification.from_pretrained(base_dir),
      peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
  with torch.no_grad():
    model.prompt_encoder["default"].embedding.weight.copy_(torch.tensor(table))
  model.eval()
  for i, ids in enumerate(rows):
    with torch.no_grad():
      theirs = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours[i], theirs, atol=1e-4, err_msg=TEXTS[i])
  # PEFT pools prompt-tuned padded batches at the last column, pad or not: no export.
  (tmp_path / "x").mkdir()
  with pytest.raises(ValueError, match="SEQ_CLS export covers LoRA/DoRA"):
    peft_export.save_adapter(cfg, params, tmp_path / "x", None)
