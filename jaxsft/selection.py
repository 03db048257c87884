"""Which evaluation's weights a stage ends with, and when it stops early.

A stage with ``best_metric`` keeps the weights of its best evaluation (the
trainer writes them to ``stages/NAME/best``) and ends with those as its
``final``, as transformers' ``load_best_model_at_end`` with
``metric_for_best_model``; with ``early_stopping_patience`` N it also stops
once N evaluations in a row have not improved on the best, as transformers'
``EarlyStoppingCallback``. The metric comes from the evaluation rows the
stage writes: ``eval_every``'s (loss, and a head's accuracy, pairwise accuracy
or margin) or ``generate_eval``'s (exact match, F1, parse failures). An
``eval_every`` metric may name one eval dataset, ``METRIC/DATASET`` (e.g.
``loss/intent_train``): a multi-task stage then keeps the weights best at
that task (the eval row's ``datasets``).

``Selection`` is the bookkeeping: the best value and step so far, recorded
beside the best weights, so a resumed stage picks up the same best and the
same count of evaluations without improvement.
"""
from __future__ import annotations

import json
import pathlib

# metric -> (the split of the metrics rows that carry it, whether larger is better)
METRICS = {
    "loss": ("eval", False),
    "accuracy": ("eval", True),
    "pairwise_accuracy": ("eval", True),
    "margin": ("eval", True),
    "exact_match": ("generate", True),
    "micro_f1": ("generate", True),
    "macro_f1": ("generate", True),
    "parse_failure_rate": ("generate", False),
}
# The head metrics exist only for their objective (models/heads.py METRICS).
OBJECTIVE_METRICS = {"accuracy": ("cls",), "pairwise_accuracy": ("reward",),
                     "margin": ("reward",)}
RECORD_FILE = "best.json"


def split_metric(metric: str) -> tuple[str, str | None]:
  """``"loss/intent"`` → ("loss", "intent"); ``"loss"`` → ("loss", None)."""
  base, _, dataset = metric.partition("/")
  return base, dataset or None


def validate(stage, where: str) -> None:
  """Refuse a stage whose ``best_metric`` no evaluation of it produces, or a
  patience without a metric; the message says which key to set."""
  metric, patience = stage.best_metric, stage.early_stopping_patience
  if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
    raise ValueError(f"{where}.early_stopping_patience={patience!r} must be an integer >= 0 "
                     "(0: off; N: stop after N evaluations without improvement)")
  if metric is None:
    if patience:
      raise ValueError(f"{where}.early_stopping_patience={patience} needs {where}.best_metric "
                       f"(one of {', '.join(METRICS)})")
    return
  metric, dataset = split_metric(metric)
  if metric not in METRICS:
    raise ValueError(f"{where}.best_metric={stage.best_metric!r} is not one of "
                     f"{', '.join(METRICS)} (or METRIC/DATASET for one eval dataset's)")
  if dataset is not None and METRICS[metric][0] != "eval":
    raise ValueError(f"{where}.best_metric={stage.best_metric!r}: only eval_every's metrics "
                     "are measured per eval dataset")
  objectives = OBJECTIVE_METRICS.get(metric)
  if objectives and stage.objective not in objectives:
    raise ValueError(f"{where}.best_metric={metric!r}: a {stage.objective} stage's evaluation "
                     f"has no {metric} (it is a {'/'.join(objectives)} metric)")
  split = METRICS[metric][0]
  if split == "eval" and not stage.eval_every:
    raise ValueError(f"{where}.best_metric={metric!r} is measured by evaluation: set "
                     f"{where}.eval_every (and data.eval_fraction or data.eval_datasets)")
  if split == "generate" and not stage.generate_eval.get("every"):
    raise ValueError(f"{where}.best_metric={metric!r} is measured by generate_eval: set "
                     f"{where}.generate_eval.every and its path")


def check_datasets(metric: str | None, names: list[str], where: str) -> None:
  """Refuse a ``METRIC/DATASET`` whose dataset is not among the stage's eval
  datasets ``names`` (known once its data is read)."""
  dataset = split_metric(metric)[1] if metric else None
  if dataset is not None and dataset not in names:
    raise ValueError(f"{where}.best_metric={metric!r}: the stage has no eval dataset "
                     f"{dataset!r}; its eval datasets are {names}")


class Selection:
  """The best evaluation of one stage so far (``best_metric``) and the
  early-stopping count (``early_stopping_patience``, 0: never stop).

  ``best_dir`` holds the best weights (the trainer writes them) and, once they
  are complete, RECORD_FILE naming their metric value and step: a directory
  replaced by newer weights loses the record with the old ones, so a record
  always describes the weights beside it. ``every``: the steps between
  evaluations of the metric's split, so that after a resume at step ``start``
  the count is the number of evaluations since the best one.
  """

  def __init__(self, metric: str, patience: int, every: int, best_dir: pathlib.Path,
               start: int):
    self.metric, self.patience, self.every = metric, patience, every
    self.base, self.dataset = split_metric(metric)
    self.split, self.larger_is_better = METRICS[self.base]
    self.best_dir = pathlib.Path(best_dir)
    self.value = self.step = None
    self.since = 0
    record = self.best_dir / RECORD_FILE
    if record.is_file():
      saved = json.loads(record.read_text())
      # A best written after the checkpoint this stage resumes from is found
      # again when training gets there (and is overwritten before: the first
      # evaluation after a resume always counts as the best so far).
      if saved["metric"] == metric and saved["best_step"] <= start:
        self.value, self.step = saved["value"], saved["best_step"]
        self.since = start // every - self.step // every

  def observe(self, row: dict) -> bool:
    """Whether metrics ``row`` is a new best (then the caller writes its
    weights to ``best_dir`` and calls ``write``); a row that is not counts
    toward the patience. Rows of other splits, or without the metric, are
    ignored. With one eval dataset, the row's own figures are that dataset's."""
    if row.get("split") != self.split:
      return False
    if self.dataset is not None and "datasets" in row:
      row_values = row["datasets"].get(self.dataset, {})
    else:
      row_values = row
    value = row_values.get(self.base)
    if value is None:
      return False
    if self.value is not None and not (
        value > self.value if self.larger_is_better else value < self.value):
      self.since += 1
      return False
    self.value, self.step, self.since = value, row["step"], 0
    return True

  def write(self) -> None:
    """Record the best beside its weights (call on one process)."""
    (self.best_dir / RECORD_FILE).write_text(json.dumps(self.row()) + "\n")

  def row(self) -> dict:
    """The best so far, as fields of a metrics row (and of the record)."""
    return {"metric": self.metric, "value": self.value, "best_step": self.step}

  @property
  def stop(self) -> bool:
    """Whether ``patience`` evaluations in a row did not improve."""
    return bool(self.patience) and self.since >= self.patience
