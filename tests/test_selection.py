"""A stage's ``best_metric`` and ``early_stopping_patience`` (jaxsft/selection.py)."""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_fixtures
from jaxsft import checkpoint as checkpoint_lib
from jaxsft import config as config_lib
from jaxsft import selection, trainer


def _config(tmp_path, steps, patience=0, **stage):
  """A run whose evaluation loss is best at step 2 of 2, 4, 6, ...: a constant
  lr of 0.3 makes the tiny model's first updates overshoot (4.4 at step 2,
  6.0 and 6.4 at steps 4 and 6 on the machines this ran on)."""
  c = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out", sft_steps=steps,
                                 eval_every=2, checkpoint_every=2, keep_checkpoints=20)
  del c.stages["cpt"]
  sft = c.stages.sft
  sft.update({**dict(lr=0.3, schedule="constant", best_metric="loss",
                    early_stopping_patience=patience), **stage})
  sft.data.eval_fraction = 0.2
  return c


def _rows(out: pathlib.Path, split: str) -> list[dict]:
  return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
          if r.get("split") == split]


def _weights_at(out: pathlib.Path, step: int):
  """The parameters of the stage's orbax checkpoint at ``step``."""
  manager = ocp.CheckpointManager((out / "stages" / "sft" / "checkpoints").resolve(),
                                  item_names=("state", "data"))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored.state["params"]


def _assert_same(a, b):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                                    np.asarray(y)), a, b)


def test_the_stage_ends_with_the_weights_of_its_best_evaluation(tmp_path):
  out = pathlib.Path(trainer.train(_config(tmp_path, steps=8)))
  evals = _rows(out, "eval")
  assert [r["step"] for r in evals] == [2, 4, 6, 8]
  best = min(evals, key=lambda r: r["loss"])
  assert best["step"] != 8, evals  # else the test shows nothing
  record = json.loads((out / "stages" / "sft" / "best" / selection.RECORD_FILE).read_text())
  assert record == {"metric": "loss", "value": best["loss"], "best_step": best["step"]}
  _, final = checkpoint_lib.load_model(out / "stages" / "sft" / "final")
  _assert_same(final, _weights_at(out, best["step"]))
  with pytest.raises(AssertionError):
    _assert_same(final, _weights_at(out, 8))


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path):
  out = pathlib.Path(trainer.train(_config(tmp_path, steps=16, patience=2)))
  evals = _rows(out, "eval")
  losses = [r["loss"] for r in evals]
  # Stopped at the second evaluation in a row that did not beat the best.
  assert len(losses) == 3 and losses[0] < min(losses[1:]), evals
  assert _rows(out, "early_stop") == [{"stage": "sft", "step": 6, "split": "early_stop",
                                       "metric": "loss", "value": losses[0], "best_step": 2}]
  assert max(r["step"] for r in _rows(out, "train")) == 6
  _, final = checkpoint_lib.load_model(out / "stages" / "sft" / "final")
  _assert_same(final, _weights_at(out, 2))
  # The stage is finished: running the command again trains nothing more.
  lines = (out / "metrics.jsonl").read_text()
  trainer.train(_config(tmp_path, steps=16, patience=2))
  assert not [r for r in map(json.loads, (out / "metrics.jsonl").read_text()
                             [len(lines):].splitlines()) if r.get("split") == "train"]


def test_the_best_at_one_eval_dataset(tmp_path):
  """best_metric 'loss/text' follows that eval dataset's loss in a stage with
  two (its held-out chats and an eval file of raw text); a name the stage does
  not have is refused, listing the ones it has."""
  config = _config(tmp_path, steps=8, best_metric="loss/text")
  files = train_fixtures.write_data(tmp_path / "data")
  config.stages.sft.data.eval_datasets = [str(files["text"])]
  out = pathlib.Path(trainer.train(config))
  losses = {r["step"]: r["datasets"]["text"]["loss"] for r in _rows(out, "eval")}
  assert len(losses) == 4 and all(r["datasets"].keys() == {"chat", "text"}
                                  for r in _rows(out, "eval"))
  step = min(losses, key=losses.get)
  record = json.loads((out / "stages" / "sft" / "best" / selection.RECORD_FILE).read_text())
  assert record == {"metric": "loss/text", "value": losses[step], "best_step": step}
  config.stages.sft.best_metric = "loss/txt"
  config.output_dir = str(tmp_path / "other")
  with pytest.raises(ValueError, match=r"best_metric='loss/txt': the stage has no eval dataset "
                                       r"'txt'; its eval datasets are \['chat', 'text'\]"):
    trainer.train(config)
  assert not (tmp_path / "other").exists()  # refused with the config, before any stage ran


def test_a_resumed_stage_keeps_its_best_and_its_count(tmp_path):
  """The record beside the best weights brings back the best and the number
  of evaluations since it; a best recorded after the resumed step is dropped
  (training reaches it again)."""
  best = tmp_path / "best"
  best.mkdir()
  s = selection.Selection("loss", 3, 2, best, start=0)
  assert s.observe({"split": "eval", "step": 2, "loss": 1.0})
  s.write()
  assert not s.observe({"split": "eval", "step": 4, "loss": 1.5})
  assert not s.observe({"split": "generate", "step": 4, "exact_match": 0.1})  # not counted
  assert (s.step, s.since, s.stop) == (2, 1, False)
  resumed = selection.Selection("loss", 3, 2, best, start=6)
  assert (resumed.value, resumed.step, resumed.since) == (1.0, 2, 2)
  assert not resumed.observe({"split": "eval", "step": 8, "loss": 1.0})  # not better
  assert resumed.stop
  early = selection.Selection("loss", 3, 2, best, start=0)
  assert (early.value, early.step, early.since) == (None, None, 0)
  # Larger is better for accuracy-like metrics.
  acc = selection.Selection("exact_match", 0, 5, tmp_path, start=0)
  assert acc.observe({"split": "generate", "step": 5, "exact_match": 0.5})
  assert not acc.observe({"split": "generate", "step": 10, "exact_match": 0.4})
  assert acc.observe({"split": "generate", "step": 15, "exact_match": 0.6}) and not acc.stop


@pytest.mark.parametrize("change,message", [
    (dict(best_metric="los"), "best_metric='los' is not one of loss, accuracy"),
    (dict(best_metric="loss", eval_every=0), r"is measured by evaluation: set config\.stages"
                                             r"\.sft\.eval_every"),
    (dict(best_metric="exact_match"), r"measured by generate_eval: set config\.stages\.sft"
                                      r"\.generate_eval\.every"),
    (dict(best_metric="accuracy"), "a sft stage's evaluation has no accuracy"),
    (dict(best_metric="exact_match/chat"), "only eval_every's metrics are measured per eval"),
    (dict(best_metric=None, early_stopping_patience=2), "early_stopping_patience=2 needs"),
    (dict(early_stopping_patience=-1), "must be an integer >= 0"),
])
def test_settings_no_evaluation_can_serve_are_refused(tmp_path, change, message):
  c = _config(tmp_path, steps=4)
  c.stages.sft.update(change)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_a_lora_stage_keeps_only_its_trained_parameters_as_its_best(tmp_path):
  """A stage whose base stays frozen (LoRA) writes only what it trains as each
  new best; it still ends with the whole model of its best evaluation: the
  orbax checkpoint of that step."""
  c = _config(tmp_path, steps=8, method="lora", lr=3.0)
  c.stages.sft.peft.rank = 4
  out = pathlib.Path(trainer.train(c))
  evals = _rows(out, "eval")
  best = min(evals, key=lambda r: r["loss"])
  assert best["step"] != 8, evals  # else the test shows nothing
  best_dir = out / "stages" / "sft" / "best"
  assert not checkpoint_lib.is_checkpoint(best_dir)  # no base weights, no config
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.restore((best_dir / trainer.BEST_TRAINED_DIR).resolve())
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]]
  assert names and all("lora" in n for n in names), names
  _, final = checkpoint_lib.load_model(out / "stages" / "sft" / "final")
  assert len(names) < len(jax.tree_util.tree_leaves(final))
  _assert_same(final, _weights_at(out, best["step"]))
