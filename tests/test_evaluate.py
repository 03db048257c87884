"""Loss evaluation against transformers' own loss, and the CLI's input errors."""
from __future__ import annotations

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
  assert "--format 'alpaca' is not supported" in error(ok, "--format", "alpaca")
  assert "nothing to predict" in error(_write_jsonl(tmp_path / "one.jsonl", [{"text": ""}]))
