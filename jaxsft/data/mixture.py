"""Weighted mixtures of datasets in a deterministic, resumable order.

A mixture **epoch** is a fixed multiset of examples: dataset d contributes
``count_d`` of them, set by one of (per dataset):

  epochs=e   ``round(e · n_d)``: e=2 repeats every example exactly twice,
             e=0.5 takes half of them (a different half each mixture epoch)
  weight=w   sampling ratios among the weighted datasets: together they
             contribute as many examples as they hold (Σ n_d), split in the
             ratio of their weights (largest remainder rounding), so 3:1 over
             two datasets of 1,000 gives 1,500 and 500
  neither    epochs=1

Dataset d's examples are drawn from an endless sequence of passes, each a
fresh permutation of its n_d examples (seeded by the seed, d and the pass);
epoch m takes positions ``[m · count_d, (m + 1) · count_d)`` of it. So
oversampling is whole passes plus part of one, never duplicates within a pass
before every example has appeared, and epoch m is a pure function of
(seed, m): nothing carried over from earlier epochs.

The datasets' examples are then interleaved by a seeded permutation of the
epoch, so every stretch of the stream holds the datasets in about their
ratio, and (``RowStream``) packed into rows window by window: each run of
``window`` consecutive examples is packed by best-fit decreasing and its rows
shuffled (best-fit emits the long examples' rows first). The rows of all
epochs, one after another, are the stream; a batch may span two epochs.

The position in the stream is ``{"epoch": e, "row": r}`` (rows of epoch e
consumed): two integers the trainer checkpoints. ``RowStream.take`` from a
restored position returns exactly the rows an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from jaxsft.data import packing

# Namespaces of the random streams, so the interleave, the passes and the row
# shuffles draw independent numbers from one seed.
_INTERLEAVE, _PASS, _ROWS = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Part:
  """One dataset of a mixture: its name (for errors), its number of
  examples, and at most one of ``weight`` and ``epochs`` (module doc)."""
  name: str
  size: int
  weight: float | None = None
  epochs: float | None = None


class Mixture:
  """The per-epoch example counts and order of a list of ``Part``s."""

  def __init__(self, parts: Sequence[Part], seed: int = 0):
    if not parts:
      raise ValueError("data.datasets is empty: list at least one dataset, e.g. "
                       "datasets=[dict(path='train.jsonl')]")
    for p in parts:
      _check_part(p)
    self.parts, self.seed = list(parts), int(seed)
    self.counts = _counts(self.parts)

  @property
  def epoch_size(self) -> int:
    """Examples per mixture epoch."""
    return int(sum(self.counts))

  def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset, example)`` index arrays of epoch ``epoch``, in stream order."""
    labels = np.repeat(np.arange(len(self.parts)), self.counts)
    labels = _rng(self.seed, _INTERLEAVE, epoch).permutation(labels)
    examples = np.empty(len(labels), np.int64)
    for d, (part, count) in enumerate(zip(self.parts, self.counts)):
      examples[labels == d] = self._draw(d, part.size, epoch * count, count)
    return labels, examples

  def _draw(self, d: int, size: int, start: int, count: int) -> np.ndarray:
    """Positions ``[start, start + count)`` of dataset d's endless passes."""
    pos = np.arange(start, start + count, dtype=np.int64)
    passes, offsets = pos // size, pos % size
    out = np.empty(count, np.int64)
    for q in np.unique(passes).tolist():
      sel = passes == q
      out[sel] = _rng(self.seed, _PASS, d, q).permutation(size)[offsets[sel]]
    return out


@dataclasses.dataclass
class EpochRows:
  """The rows of one epoch: row j holds the examples ``items[starts[j]:starts[j + 1]]``
  (global example ids, in segment order)."""
  items: np.ndarray
  starts: np.ndarray

  def __len__(self) -> int:
    return len(self.starts) - 1

  def row(self, j: int) -> np.ndarray:
    return self.items[self.starts[j]:self.starts[j + 1]]


class RowStream:
  """The mixture's epochs packed into rows (module doc), with a resumable position.

  ``lengths[d]`` holds the token counts of dataset d's examples; an example is
  named by its global id, ``offsets[d] + index`` (``offsets`` is the running
  sum of the datasets' sizes). ``packing=False`` puts one example in each row,
  in stream order.
  """

  def __init__(self, mixture: Mixture, lengths: Sequence[np.ndarray], seq_len: int,
               packing: bool = True, window: int = 10_000):
    assert [len(x) for x in lengths] == [p.size for p in mixture.parts]
    if window < 1:
      raise ValueError(f"data.shuffle_buffer must be at least 1 example, got {window}")
    self.mixture, self.seq_len, self.packing, self.window = mixture, seq_len, packing, window
    self.offsets = np.concatenate([[0], np.cumsum([len(x) for x in lengths])]).astype(np.int64)
    self.lengths = (np.concatenate(lengths).astype(np.int64) if lengths
                    else np.zeros(0, np.int64))
    longest = int(self.lengths.max(initial=0))
    if longest > seq_len:
      raise ValueError(f"an example has {longest} tokens, more than seq_len={seq_len}; set "
                       "data.max_length <= seq_len")
    self._memo: dict[int, EpochRows] = {}

  def epoch(self, epoch: int) -> EpochRows:
    """The rows of ``epoch`` (computed from lengths only; the last two are memoized)."""
    if epoch not in self._memo:
      if len(self._memo) >= 2:
        self._memo.pop(min(self._memo))
      self._memo[epoch] = self._plan(epoch)
    return self._memo[epoch]

  def _plan(self, epoch: int) -> EpochRows:
    d, i = self.mixture.epoch_order(epoch)
    ids = self.offsets[d] + i
    lengths = self.lengths[ids]
    rows: list[np.ndarray] = []
    for w, start in enumerate(range(0, len(ids), self.window)):
      stop = start + self.window
      plan = packing.plan_rows(lengths[start:stop], self.seq_len, self.packing)
      if self.packing:
        order = _rng(self.mixture.seed, _ROWS, epoch, w).permutation(len(plan))
        plan = [plan[k] for k in order]
      window_ids = ids[start:stop]
      rows.extend(window_ids[r] for r in plan)
    sizes = np.array([len(r) for r in rows], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    items = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return EpochRows(items, starts)

  def check(self, state: dict) -> tuple[int, int]:
    """``(epoch, row)`` of a position, validated against this data."""
    try:
      epoch, row = int(state["epoch"]), int(state["row"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"data state {state!r} is not a position of the data stream; expected "
                       "{'epoch': int, 'row': int} as returned by state()") from None
    if epoch < 0 or not 0 <= row <= len(self.epoch(epoch)):
      raise ValueError(f"data state {state!r} is outside the data: epoch {epoch} has "
                       f"{len(self.epoch(max(epoch, 0)))} rows; the data or its settings "
                       "(datasets, seq_len, packing, shuffle_buffer, seed) changed since the state "
                       "was saved")
    return epoch, row

  def take(self, state: dict, n: int, stop_epoch: int | None = None
           ) -> tuple[list[np.ndarray], dict]:
    """The next ``n`` rows from position ``state`` and the position after them.

    With ``stop_epoch``, rows end at the start of that epoch (fewer than ``n``
    may come back, none at the end).
    """
    epoch, row = self.check(state)
    out: list[np.ndarray] = []
    while len(out) < n and (stop_epoch is None or epoch < stop_epoch):
      rows = self.epoch(epoch)
      k = min(n - len(out), len(rows) - row)
      out.extend(rows.row(j) for j in range(row, row + k))
      row += k
      if row == len(rows):
        epoch, row = epoch + 1, 0
    return out, {"epoch": epoch, "row": row}


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng([int(k) for k in key])


def _check_part(p: Part) -> None:
  where = f"dataset {p.name!r}"
  if p.weight is not None and p.epochs is not None:
    raise ValueError(f"{where}: set weight (a sampling ratio) or epochs (repetitions), not both")
  for key in ("weight", "epochs"):
    value = getattr(p, key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
      raise ValueError(f"{where}: {key}={value} must be a positive number; remove the dataset "
                       f"to leave it out")
  if p.size < 1:
    raise ValueError(f"{where}: no examples to train on")


def _counts(parts: list[Part]) -> list[int]:
  counts = [0] * len(parts)
  weighted = [i for i, p in enumerate(parts) if p.weight is not None]
  for i, p in enumerate(parts):
    if p.weight is None:
      counts[i] = int(round((1.0 if p.epochs is None else p.epochs) * p.size))
  if weighted:
    total = sum(parts[i].size for i in weighted)
    w_sum = sum(parts[i].weight for i in weighted)
    shares = [parts[i].weight / w_sum * total for i in weighted]
    floors = [int(math.floor(s)) for s in shares]
    # Largest remainders get the leftover examples, so the counts add up.
    by_remainder = sorted(range(len(weighted)), key=lambda k: (floors[k] - shares[k], k))
    for k in by_remainder[:total - sum(floors)]:
      floors[k] += 1
    for k, i in enumerate(weighted):
      counts[i] = floors[k]
  for p, c in zip(parts, counts):
    if c < 1:
      what = f"weight={p.weight}" if p.weight is not None else f"epochs={p.epochs}"
      raise ValueError(f"dataset {p.name!r}: {what} gives it no examples in a mixture epoch "
                       f"(of {p.size} examples); raise it or remove the dataset")
  return counts
