"""Packing tokenized examples into fixed-length rows.

A batch row is ``seq_len`` tokens holding one or more whole examples
(segments). Four arrays [rows, seq_len] describe it:

  tokens       token ids; padding is ``pad_id``
  loss_mask    1 where the token is a trained target (the example's own mask:
               answers of a chat, every token of raw text), 0 elsewhere
  segment_ids  1, 2, … for the examples of the row, in order; 0 = padding
  positions    0, 1, … restarting at each segment; 0 on padding

The model attends only within a segment and the loss predicts only within one
(``losses.next_token_targets``), so a packed row gives every example exactly
the loss it has alone in an unpadded row. Example (seq_len 8): a chat of 4
tokens whose answer is the last 2, and a raw text of 3 tokens, all trained:

  tokens       a0 a1 a2 a3 b0 b1 b2 pad
  loss_mask     0  0  1  1  1  1  1  0
  segment_ids   1  1  1  1  2  2  2  0
  positions     0  1  2  3  0  1  2  0

Rows are chosen by best-fit decreasing (``best_fit_decreasing``): longest
example first, each into the open row with the least room that still fits it.
On the synthetic SFT set of docs/BENCHMARKS.md (mean 293 tokens, long-tailed)
it fills 99.9% of 2048-token rows, where one example per row
(``packing=False``, kept for comparison) fills the mean length over
``seq_len``: 14%. Examples longer than ``seq_len`` must have been dropped or
truncated before (``templates.encode`` with ``max_length <= seq_len``).
"""
from __future__ import annotations

import bisect
from typing import Callable, Sequence

import numpy as np

FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")


def best_fit_decreasing(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
  """Group example indices into rows of at most ``seq_len`` tokens.

  Best-fit decreasing: examples longest first (ties in index order, so the
  result is deterministic), each placed in the open row whose free space is
  the smallest that still holds it, or in a new row. Within a row, indices
  are in placement order. Rows come out in creation order (longest first);
  callers shuffle them.
  """
  lengths = np.asarray(lengths, dtype=np.int64)
  _check_lengths(lengths, seq_len)
  order = np.argsort(-lengths, kind="stable")
  rows: list[list[int]] = []
  # (free space, row) of rows that still have room, sorted: bisect finds the
  # tightest fit in O(log rows); the insert is a memmove.
  free: list[tuple[int, int]] = []
  for i in order.tolist():
    n = int(lengths[i])
    k = bisect.bisect_left(free, (n, -1))
    if k == len(free):
      rows.append([i])
      room = seq_len - n
      row = len(rows) - 1
    else:
      room, row = free.pop(k)
      rows[row].append(i)
      room -= n
    if room > 0:
      bisect.insort(free, (room, row))
  return rows


def one_per_row(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
  """One example per row, in the given order (the unpacked, padded mode)."""
  lengths = np.asarray(lengths, dtype=np.int64)
  _check_lengths(lengths, seq_len)
  return [[i] for i in range(len(lengths))]


def plan_rows(lengths: Sequence[int], seq_len: int, packing: bool = True) -> list[list[int]]:
  """``best_fit_decreasing`` if ``packing`` else ``one_per_row``."""
  return (best_fit_decreasing if packing else one_per_row)(lengths, seq_len)


def fill_rows(rows: Sequence[Sequence[int]], get: Callable[[int], tuple[np.ndarray, np.ndarray]],
              seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """The arrays (module doc) of ``rows``, each a list of example keys that
  ``get(key) -> (token ids, loss mask)`` resolves."""
  shape = (len(rows), seq_len)
  out = {"tokens": np.full(shape, pad_id, np.int32), "loss_mask": np.zeros(shape, np.int32),
         "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}
  ramp = np.arange(seq_len, dtype=np.int32)
  for r, row in enumerate(rows):
    at = 0
    for s, key in enumerate(row, 1):
      ids, mask = get(key)
      n = len(ids)
      assert at + n <= seq_len, f"row {r} overflows: {at} + {n} > {seq_len}"
      out["tokens"][r, at:at + n] = ids
      out["loss_mask"][r, at:at + n] = mask
      out["segment_ids"][r, at:at + n] = s
      out["positions"][r, at:at + n] = ramp[:n]
      at += n
  return out


def fill_head_rows(rows: Sequence[Sequence[int]],
                   get: Callable[[int], tuple[np.ndarray, np.ndarray]], seq_len: int,
                   pad_id: int, slots: int,
                   labels: Callable[[int], Sequence[int]] | None = None,
                   max_labels: int = 1) -> dict[str, np.ndarray]:
  """Rows for a task head: like ``fill_rows``, but an example's mask marks the
  last token of each of its sequences (``templates.encode_head``: one for a
  classification example, chosen then rejected for a pair), each sequence is
  its own segment, and instead of ``loss_mask`` the rows carry

    pool_index  [rows, slots]   the column of every marked token, in order; -1 = none
    labels      [rows, slots, max_labels]   (with ``labels``) the label ids of
                each marked token's example, -1 padded

  So a pair's chosen and rejected scores are slots 2j and 2j+1 of a row.
  """
  shape = (len(rows), seq_len)
  out = {"tokens": np.full(shape, pad_id, np.int32), "segment_ids": np.zeros(shape, np.int32),
         "positions": np.zeros(shape, np.int32),
         "pool_index": np.full((len(rows), slots), -1, np.int32)}
  if labels is not None:
    out["labels"] = np.full((len(rows), slots, max_labels), -1, np.int32)
  for r, row in enumerate(rows):
    at, seg, slot = 0, 0, 0
    for key in row:
      ids, mask = get(key)
      n = len(ids)
      assert at + n <= seq_len, f"row {r} overflows: {at} + {n} > {seq_len}"
      ends = np.flatnonzero(np.asarray(mask)) + 1
      assert len(ends) and ends[-1] == n, f"example {key}: its last token must be marked"
      ids_of = list(labels(key)) if labels is not None else None
      start = 0
      for end in ends:
        seg += 1
        out["tokens"][r, at + start:at + end] = ids[start:end]
        out["segment_ids"][r, at + start:at + end] = seg
        out["positions"][r, at + start:at + end] = np.arange(end - start, dtype=np.int32)
        assert slot < slots, f"row {r}: more than {slots} sequences"
        out["pool_index"][r, slot] = at + end - 1
        if ids_of is not None:
          out["labels"][r, slot, :len(ids_of)] = ids_of
        slot += 1
        start = end
      at += n
  return out


def pack(examples: Sequence, seq_len: int, pad_id: int = 0, packing: bool = True
         ) -> tuple[dict[str, np.ndarray], list[list[int]]]:
  """Pack ``Encoded`` examples (or ``(input_ids, loss_mask)`` pairs) into
  rows; returns the arrays and, per row, the example indices in segment order
  (segment s of row r is example ``rows[r][s - 1]``)."""
  pairs = [(e.input_ids, e.loss_mask) if hasattr(e, "input_ids") else e for e in examples]
  for e, (ids, _) in zip(examples, pairs):
    if len(ids) > seq_len:
      raise ValueError(f"{getattr(e, 'source', '') or 'an example'}: {len(ids)} tokens, more "
                       f"than seq_len={seq_len}; drop or truncate examples to max_length <= "
                       "seq_len before packing (data.max_length, data.truncation)")
  rows = plan_rows([len(ids) for ids, _ in pairs], seq_len, packing)
  arrays = fill_rows(rows, lambda i: (np.asarray(pairs[i][0]), np.asarray(pairs[i][1])),
                     seq_len, pad_id)
  return arrays, rows


def efficiency(batch: dict[str, np.ndarray]) -> float:
  """Non-pad tokens / all tokens of a batch (1.0 = no padding)."""
  seg = batch["segment_ids"]
  return float(np.count_nonzero(seg)) / seg.size if seg.size else 0.0


def _check_lengths(lengths: np.ndarray, seq_len: int) -> None:
  if seq_len < 1:
    raise ValueError(f"seq_len must be at least 1, got {seq_len}")
  if len(lengths) and lengths.min() < 1:
    raise ValueError(f"example {int(np.argmin(lengths))} has no tokens; every example needs at "
                     "least one")
  if len(lengths) and lengths.max() > seq_len:
    i = int(np.argmax(lengths))
    raise ValueError(f"example {i} has {int(lengths[i])} tokens, more than seq_len={seq_len}; "
                     "drop or truncate examples to max_length <= seq_len before packing "
                     "(data.max_length, data.truncation)")
