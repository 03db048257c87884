"""Inspect a stage's data before training on it.

    python -m jaxsft.data --config configs/X.py [--config.KEY=VALUE ...] [--stage NAME]
        [--show N] [--score-with MODEL] [--top K]

Builds the stage's pipeline exactly as training does (same tokenizer,
templates, masks, mixture and packing; the tokenized cache is shared), then
prints N examples in training order with their trained tokens marked (green
on a terminal, ``[[…]]`` otherwise), a line per dataset, and, last, one JSON
line of figures (``report`` describes them). ``--score-with`` adds each
sample's answer loss under a model (Hugging Face directory or jaxsft
checkpoint), and lists the K worst and K most trivial samples.

The config needs ``tokenizer`` (a tokenizer or model directory; else
``model.source`` is used) and ``stages``: a list of ConfigDicts each with
``name``, ``seq_len`` and ``data`` (``pipeline``'s schema). ``seed`` is read
if present. A config with no ``stages`` but ``seq_len`` and ``data`` at the
top is one stage. Mistakes in the config or the data print ``error: …`` and
exit with status 2.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from absl import app, flags
from ml_collections import config_flags

from jaxsft import hf
from jaxsft.data import pipeline, report

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a get_config() module).")
_STAGE = flags.DEFINE_string("stage", None, "Stage to inspect, by name (default: the first).")
_SHOW = flags.DEFINE_integer("show", 3, "Examples to render, in training order.")
_SCORE = flags.DEFINE_string("score-with", None,
                             "Hugging Face model directory or jaxsft checkpoint: report each "
                             "sample's answer loss.")
_TOP = flags.DEFINE_integer("top", 5, "Worst and most trivial samples to list with --score-with.")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  try:
    value = cfg[key]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value


def select_stage(config, name: str | None) -> Any:
  """The stage called ``name`` (the first when None)."""
  stages = _get(config, "stages")
  if stages is None:
    if _get(config, "data") is None:
      raise ValueError("the config has no stages (a list of dicts with name, seq_len and data)")
    return config
  if not stages:
    raise ValueError("config.stages is empty")
  if hasattr(stages, "items"):  # a training config: name -> stage (jaxsft.config)
    names = list(stages.keys())
    name = names[0] if name is None else name
    if name not in names:
      raise ValueError(f"--stage {name!r}: no such stage; the stages are {names}")
    stage = stages[name]
    return {**(stage.to_dict() if hasattr(stage, "to_dict") else dict(stage)), "name": name}
  if name is None:
    return stages[0]
  names = [_get(s, "name") for s in stages]
  if name not in names:
    raise ValueError(f"--stage {name!r}: no such stage; the stages are {names}")
  return stages[names.index(name)]


def load_tokenizer(config):
  """The tokenizer of ``config.tokenizer``, else ``config.model.source``."""
  path = _get(config, "tokenizer") or _get(_get(config, "model", {}), "source")
  if not path:
    raise ValueError("the config names no tokenizer: set config.tokenizer (or model.source) to a "
                     "tokenizer or model directory")
  trust = bool(_get(_get(config, "model", {}), "trust_remote_code", False))
  if os.path.isfile(os.path.join(path, "model_config.json")):  # a jaxsft checkpoint
    path = os.path.join(path, "tokenizer")
  return hf.load_tokenizer(path, trust)


def run(config, stage: str | None = None, show: int = 3, score_with: str | None = None,
        top: int = 5, out: TextIO = sys.stdout, color: bool | None = None) -> dict[str, Any]:
  """Print the inspection of one stage to ``out``; returns the JSON figures."""
  if show < 0 or top < 0:
    raise ValueError("--show and --top must be >= 0")
  st = select_stage(config, stage)
  seq_len = _get(st, "seq_len")
  if seq_len is None:
    raise ValueError(f"stage {_get(st, 'name', '')!r} has no seq_len")
  tokenizer = load_tokenizer(config)
  objective = _get(st, "objective", "sft")
  if score_with and objective in ("cls", "reward"):
    raise ValueError(f"--score-with scores answers; a {objective} stage has none (its marked "
                     "tokens are where sequences are scored)")
  # Prompt tuning reserves virtual slots in every example, as the trainer does.
  virtual = (int(_get(_get(st, "peft", {}) or {}, "virtual_tokens", 0))
             if _get(st, "method") in ("prompt", "p_tuning") else 0)
  pipe = pipeline.build(_get(st, "data"), tokenizer, seq_len=seq_len, seed=_get(config, "seed", 0),
                        objective=objective, virtual_tokens=virtual)
  color = out.isatty() if color is None else color

  order = pipe.stream.epoch(0).items[:show]
  for i, gid in enumerate(order.tolist(), 1):
    name, ex = pipe.example(gid)
    trained = sum(ex.loss_mask[1:])
    print(f"--- example {i}/{len(order)}: {name}, {ex.source}, {len(ex.input_ids)} tokens, "
          f"{trained} trained ---", file=out)
    print(report.render(tokenizer, ex.input_ids, ex.loss_mask, color), file=out)
  if len(order):
    print("---", file=out)

  stats = pipe.stats()
  for d in stats["datasets"]:
    print(f"{d['name']}: {d['examples']} examples, {d['kept']} kept ({d['dropped_too_long']} too "
          f"long, {d['dropped_no_assistant']} without an answer, {d['truncated']} truncated), "
          f"{d['tokens']} tokens, {d['trained_tokens']} trained; {d['epoch_examples']} per "
          f"epoch, {d['eval_examples']} held out", file=out)
  figures = {"stage": _get(st, "name", ""), **report.report(pipe)}
  if score_with:
    scores = report.score(pipe, score_with)
    summary = report.score_summary(scores, top)
    for title, key in (("highest answer loss", "worst"), ("lowest answer loss", "most_trivial")):
      print(f"{title}:", file=out)
      for s in summary.get(key, []):
        print(f"  {s['loss']:8.4f}  {s['source']}  ({s['trained_tokens']} trained tokens)",
              file=out)
    figures.update(summary)
  print(json.dumps(figures, ensure_ascii=False), file=out)
  return figures


def main(argv) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    if _CONFIG.value is None:
      raise ValueError("--config is required (a config file with get_config())")
    run(_CONFIG.value, _STAGE.value, _SHOW.value, _SCORE.value, _TOP.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from jaxsft import config as config_lib  # noqa: PLC0415
  app.run(main, flags_parser=config_lib.flags_parser(_CONFIG))
