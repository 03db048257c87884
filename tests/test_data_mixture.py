"""Mixtures: per-epoch counts from weights and epochs, the deterministic order,
resuming the packed row stream from a saved position, and bad settings."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from jaxsft.data import mixture
from jaxsft.data.mixture import Mixture, Part, RowStream


def _stream(parts, seed=0, seq_len=32, packing=True, window=50, lengths_seed=0):
  rng = np.random.default_rng(lengths_seed)
  lengths = [rng.integers(3, seq_len + 1, p.size) for p in parts]
  return RowStream(Mixture(parts, seed), lengths, seq_len, packing, window)


def test_weights_3_to_1_realized_over_a_long_stream():
  mix = Mixture([Part("general", 1000, weight=3.0), Part("domain", 1000, weight=1.0)], seed=7)
  assert mix.counts == [1500, 500]
  labels = np.concatenate([mix.epoch_order(e)[0] for e in range(3)])
  # Any long stretch of the stream, not just whole epochs, holds the ratio.
  for start, stop in ((0, 2000), (700, 3700), (1234, 6000)):
    share = float(np.mean(labels[start:stop] == 0))
    assert abs(share - 0.75) < 0.03, (start, stop, share)


def test_weights_split_the_weighted_datasets_total_exactly():
  mix = Mixture([Part("a", 7, weight=1.0), Part("b", 5, weight=1.0), Part("c", 1, weight=1.0)])
  assert sum(mix.counts) == 13 and max(mix.counts) - min(mix.counts) <= 1
  # Unweighted datasets keep their own size (epochs=1) beside weighted ones.
  mix = Mixture([Part("a", 100, weight=2.0), Part("b", 100, weight=2.0), Part("c", 30)])
  assert mix.counts == [100, 100, 30]


def test_epochs_2_repeats_every_example_exactly_twice():
  mix = Mixture([Part("small", 37, epochs=2), Part("big", 100)], seed=1)
  d, i = mix.epoch_order(0)
  small = collections.Counter(i[d == 0].tolist())
  assert sorted(small) == list(range(37)) and set(small.values()) == {2}
  big = collections.Counter(i[d == 1].tolist())
  assert sorted(big) == list(range(100)) and set(big.values()) == {1}
  # The two passes are different permutations, so the copies are spread out.
  first = i[d == 0][:37]
  assert sorted(first.tolist()) == list(range(37))


def test_fractional_epochs_take_fresh_halves_that_cover_the_data():
  mix = Mixture([Part("half", 40, epochs=0.5)], seed=3)
  e0, e1 = (mix.epoch_order(e)[1] for e in (0, 1))
  assert len(e0) == len(e1) == 20
  assert sorted(np.concatenate([e0, e1]).tolist()) == list(range(40))


def test_order_is_a_function_of_the_seed():
  parts = [Part("a", 50, weight=1.0), Part("b", 80, weight=2.0)]
  a = Mixture(parts, seed=5).epoch_order(2)
  b = Mixture(parts, seed=5).epoch_order(2)
  c = Mixture(parts, seed=6).epoch_order(2)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[1], c[1])
  assert not np.array_equal(Mixture(parts, 5).epoch_order(0)[1], a[1])  # epochs differ


@pytest.mark.parametrize("packing", [True, False])
def test_every_example_of_an_epoch_is_in_exactly_one_row(packing):
  parts = [Part("a", 120, epochs=1), Part("b", 60, epochs=2)]
  stream = _stream(parts, packing=packing)
  rows = stream.epoch(0)
  d, i = stream.mixture.epoch_order(0)
  assert sorted(rows.items.tolist()) == sorted((stream.offsets[d] + i).tolist())
  for j in range(len(rows)):
    assert stream.lengths[rows.row(j)].sum() <= 32
    assert packing or len(rows.row(j)) == 1
  if packing:  # best-fit fills rows: few more than the total length needs
    assert len(rows) <= 1.1 * stream.lengths[rows.items].sum() / 32 + 1


@pytest.mark.parametrize("stop_at", [0, 1, 3, 7, 11])
def test_resume_gives_the_rows_of_an_uninterrupted_stream(stop_at):
  parts = [Part("a", 45, weight=3.0), Part("b", 20, weight=1.0)]
  batch = 8
  reference = _stream(parts, seed=11)
  state, want = {"epoch": 0, "row": 0}, []
  for _ in range(16):  # > 2 epochs of about 40 rows: batches span epoch boundaries
    rows, state = reference.take(state, batch)
    want.append([r.tolist() for r in rows])
  epochs_seen = state["epoch"]
  assert epochs_seen >= 2

  first = _stream(parts, seed=11)
  state = {"epoch": 0, "row": 0}
  for _ in range(stop_at):
    _, state = first.take(state, batch)
  saved = dict(state)
  resumed = _stream(parts, seed=11)  # a new process: nothing memoized
  got = [[r.tolist() for r in rows] for rows, saved in _takes(resumed, saved, batch,
                                                                 16 - stop_at)]
  assert got == want[stop_at:]


def _takes(stream, state, batch, n):
  for _ in range(n):
    rows, state = stream.take(state, batch)
    yield rows, state


def test_a_batch_spans_the_epoch_boundary():
  stream = _stream([Part("a", 30)], seed=2)
  n = len(stream.epoch(0))
  rows, state = stream.take({"epoch": 0, "row": n - 2}, 5)
  assert [r.tolist() for r in rows] == ([stream.epoch(0).row(j).tolist() for j in (n - 2, n - 1)]
                                        + [stream.epoch(1).row(j).tolist() for j in range(3)])
  assert state == {"epoch": 1, "row": 3}
  rows, state = stream.take({"epoch": 0, "row": n - 2}, 5, stop_epoch=1)
  assert len(rows) == 2 and state == {"epoch": 1, "row": 0}


@pytest.mark.parametrize("part, message", [
    (Part("domain", 10, weight=0), "dataset 'domain': weight=0 must be a positive number"),
    (Part("domain", 10, weight=-1.0), "dataset 'domain': weight=-1.0 must be a positive"),
    (Part("domain", 10, weight=float("nan")), "dataset 'domain': weight=nan"),
    (Part("domain", 10, weight="3"), "dataset 'domain': weight must be a number"),
    (Part("domain", 10, epochs=0), "dataset 'domain': epochs=0 must be a positive"),
    (Part("domain", 10, weight=1.0, epochs=2), "set weight (a sampling ratio) or epochs"),
    (Part("domain", 0), "dataset 'domain': no examples"),
])
def test_bad_parts_name_the_dataset(part, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    Mixture([Part("general", 10), part])


def test_empty_mixture_and_vanishing_weight():
  with pytest.raises(ValueError, match="data.datasets is empty"):
    Mixture([])
  with pytest.raises(ValueError, match="dataset 'rare': weight=0.001 gives it no examples"):
    Mixture([Part("common", 100, weight=1.0), Part("rare", 5, weight=0.001)])


def test_bad_states():
  stream = _stream([Part("a", 20)])
  for state in ({"epoch": 0}, None, {"epoch": "x", "row": 0}):
    with pytest.raises(ValueError, match="not a position of the data stream"):
      stream.take(state, 1)
  with pytest.raises(ValueError, match="changed since the state was saved"):
    stream.take({"epoch": 0, "row": 10_000}, 1)
  with pytest.raises(ValueError, match="shuffle_buffer must be at least 1"):
    mixture.RowStream(Mixture([Part("a", 3)]), [np.ones(3, int)], 8, True, 0)
  with pytest.raises(ValueError, match="more than seq_len=8"):
    mixture.RowStream(Mixture([Part("a", 3)]), [np.array([1, 9, 2])], 8)
