"""Packing: the row arrays, best-fit decreasing, and what the model makes of
packed rows: per-example losses equal to unpacked ones, no attention across
segments, the masked loss equal to transformers' with -100 labels, and
token-weighted gradient accumulation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_builders
from jaxsft import hf, losses
from jaxsft.data import Conversation, Encoded, Message, encode, get_template, packing
from jaxsft.models import llama

SEQ = 128


def test_row_arrays_as_columns():
  chat = Encoded([10, 11, 12, 13], [0, 0, 1, 1], "chat.jsonl:1")
  text = Encoded([20, 21, 22], [1, 1, 1], "text.jsonl:1")
  arrays, rows = packing.pack([text, chat], seq_len=8, pad_id=0)
  assert rows == [[1, 0]]  # longest first
  got = np.concatenate([arrays[f] for f in packing.FIELDS])
  want = np.array([
      # a0  a1  a2  a3  b0  b1  b2  pad
      [10, 11, 12, 13, 20, 21, 22, 0],   # tokens
      [0,  0,  1,  1,  1,  1,  1,  0],   # loss_mask
      [1,  1,  1,  1,  2,  2,  2,  0],   # segment_ids
      [0,  1,  2,  3,  0,  1,  2,  0],   # positions
  ])
  np.testing.assert_array_equal(got, want)
  assert all(arrays[f].dtype == np.int32 for f in packing.FIELDS)
  assert packing.efficiency(arrays) == 7 / 8


def test_unpacked_mode_is_one_example_per_row():
  arrays, rows = packing.pack([([5, 6], [1, 1]), ([7], [1]), ([8, 9, 9], [0, 1, 1])], 4, 3,
                              packing=False)
  assert rows == [[0], [1], [2]]
  np.testing.assert_array_equal(arrays["tokens"], [[5, 6, 3, 3], [7, 3, 3, 3], [8, 9, 9, 3]])
  np.testing.assert_array_equal(arrays["segment_ids"].max(axis=1), [1, 1, 1])
  assert packing.efficiency(arrays) == 6 / 12


def test_best_fit_decreasing():
  rng = np.random.default_rng(0)
  lengths = np.minimum(rng.geometric(1 / 300, 2000), 1024)  # long-tailed, like SFT data
  rows = packing.best_fit_decreasing(lengths, 1024)
  assert sorted(i for r in rows for i in r) == list(range(2000))
  assert max(lengths[r].sum() for r in rows) <= 1024
  lower_bound = -(-lengths.sum() // 1024)
  assert len(rows) <= lower_bound * 1.02 + 1
  assert rows == packing.best_fit_decreasing(lengths, 1024)  # deterministic
  # Best fit, not first fit: 5 goes into the row with 5 free, not the one with 6.
  assert packing.best_fit_decreasing([4, 5, 5], 10) == [[1, 2], [0]]
  assert packing.best_fit_decreasing([6, 5, 4], 10) == [[0, 2], [1]]


def test_too_long_and_empty_examples_are_errors():
  with pytest.raises(ValueError, match="long.jsonl:3: 9 tokens, more than seq_len=8"):
    packing.pack([Encoded([1] * 9, [1] * 9, "long.jsonl:3")], 8)
  with pytest.raises(ValueError, match="example 1 has 9 tokens, more than seq_len=8"):
    packing.best_fit_decreasing([3, 9], 8)
  with pytest.raises(ValueError, match="example 0 has no tokens"):
    packing.best_fit_decreasing([0, 3], 8)


# ----------------------------------------------------------------------------- with a model

@pytest.fixture(scope="module")
def examples():
  """Chats (one multi-turn, one with a system prompt) and raw text, encoded
  with ChatML on the shared tiny tokenizer: lengths 20–64, mixed masks."""
  tok = hf_builders.build_tokenizer()
  template = get_template("chatml", tok)
  convs = [
      Conversation([Message("user", "Hi"), Message("assistant", "The quick brown fox.")]),
      Conversation([Message("system", "Be brief."), Message("user", "def add(a, b):"),
                    Message("assistant", "return a + b")]),
      Conversation([Message("user", "Why?"), Message("assistant", "Fine-tuning."),
                    Message("user", "More?"), Message("assistant", "JAX is fast and correct.")]),
      Conversation(kind="text", text="The quick brown fox jumps over the lazy dog."),
      Conversation([Message("user", "你好"), Message("assistant", "今天的天气怎么样？")]),
      Conversation(kind="text", text="def add(a, b):\n    return a + b\n"),
  ]
  out = [encode(c, template, tok) for c in convs]
  assert all(10 <= len(e) <= 64 for e in out), [len(e) for e in out]
  return out


@pytest.fixture(scope="module")
def model(hf_model_factory):
  path, torch_model = hf_model_factory("llama")
  cfg, params = hf.load_params(path)
  return cfg, params, torch_model


def _batch(examples, packed, rows=None):
  arrays, plan = packing.pack(examples, SEQ, pad_id=0, packing=packed)
  if rows is not None:  # same shape for packed and unpacked: one compile
    arrays = packing.fill_rows(plan + [[]] * (rows - len(plan)),
                               lambda i: (np.asarray(examples[i].input_ids),
                                          np.asarray(examples[i].loss_mask)), SEQ)
  return arrays, plan


@functools.lru_cache(maxsize=None)
def _token_nll(cfg):
  @jax.jit
  def fn(params, tokens, segment_ids, positions, loss_mask):
    logits, _ = llama.forward(cfg, params, tokens, positions, segment_ids)
    targets, weights = losses.next_token_targets(tokens, segment_ids, loss_mask)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return nll * weights, weights, logits
  return fn


def _per_example(model, arrays, plan):
  cfg, params, _ = model
  nll, weights, _ = _token_nll(cfg)(params, *(arrays[f] for f in (
      "tokens", "segment_ids", "positions", "loss_mask")))
  nll, weights = np.asarray(nll), np.asarray(weights)
  out = {}
  for r, row in enumerate(plan):
    for s, i in enumerate(row, 1):
      seg = arrays["segment_ids"][r] == s
      out[i] = (nll[r][seg].sum(), weights[r][seg].sum())
  return out


def test_packed_and_unpacked_give_each_example_the_same_loss(examples, model):
  n = len(examples)
  packed, packed_plan = _batch(examples, True, rows=n)
  unpacked, unpacked_plan = _batch(examples, False, rows=n)
  assert sum(1 for r in packed_plan if r) < n and max(len(r) for r in packed_plan) >= 2
  a = _per_example(model, packed, packed_plan)
  b = _per_example(model, unpacked, unpacked_plan)
  assert sorted(a) == sorted(b) == list(range(n))
  for i in range(n):
    assert a[i][1] == b[i][1] == sum(examples[i].loss_mask[1:])
    np.testing.assert_allclose(a[i][0], b[i][0], rtol=1e-5, atol=1e-5)


def test_no_attention_across_segments(examples, model):
  cfg, params, _ = model
  n = len(examples)
  arrays, plan = _batch(examples, True, rows=n)
  r = next(j for j, row in enumerate(plan) if len(row) >= 2)
  seg = arrays["segment_ids"][r]
  fields = ("tokens", "segment_ids", "positions", "loss_mask")
  _, _, logits = _token_nll(cfg)(params, *(arrays[f] for f in fields))
  changed = {k: v.copy() for k, v in arrays.items()}
  first = seg == 1
  changed["tokens"][r, first] = (changed["tokens"][r, first] + 7) % cfg.vocab_size
  _, _, logits2 = _token_nll(cfg)(params, *(changed[f] for f in fields))
  later = seg >= 2
  np.testing.assert_array_equal(np.asarray(logits)[r, later], np.asarray(logits2)[r, later])
  assert not np.allclose(np.asarray(logits)[r, first], np.asarray(logits2)[r, first])


def test_masked_loss_equals_transformers_loss_with_ignore_labels(examples, model):
  cfg, params, torch_model = model
  arrays, _ = _batch(examples, False)
  hidden, _ = llama.hidden_states(cfg, params, arrays["tokens"], arrays["positions"],
                                  arrays["segment_ids"])
  targets, weights = losses.next_token_targets(arrays["tokens"], arrays["segment_ids"],
                                               arrays["loss_mask"])
  loss_sum, count = losses.masked_cross_entropy(hidden, llama.unembedding(cfg, params), targets,
                                                weights)

  real = arrays["segment_ids"] > 0
  labels = np.where(real & (arrays["loss_mask"] == 1), arrays["tokens"], -100)
  with torch.no_grad():
    out = torch_model(input_ids=torch.from_numpy(arrays["tokens"]).long(),
                      attention_mask=torch.from_numpy(real.astype(np.int64)),
                      labels=torch.from_numpy(labels).long())
  # HF supervises token t+1 from t where labels[t+1] != -100: the same tokens.
  assert int(count) == int((labels[:, 1:] != -100).sum())
  np.testing.assert_allclose(float(loss_sum / count), out.loss.item(), rtol=1e-5)


def test_gradient_accumulation_is_token_weighted(examples, model):
  cfg, params, _ = model
  fields = ("tokens", "segment_ids", "positions", "loss_mask")

  def loss(params, tokens, segment_ids, positions, loss_mask):
    hidden, _ = llama.hidden_states(cfg, params, tokens, positions, segment_ids)
    targets, weights = losses.next_token_targets(tokens, segment_ids, loss_mask)
    return losses.masked_cross_entropy(hidden, llama.unembedding(cfg, params), targets, weights)

  grad_sum = jax.jit(jax.grad(lambda *a: loss(*a)[0]))
  grad_mean = jax.jit(jax.grad(lambda *a: (lambda s, n: s / n)(*loss(*a))))
  # Three micro-batches of one unpacked example each, with different trained token counts.
  picks = [0, 1, 2]
  micro = [_batch([examples[i]], False)[0] for i in picks]
  counts = [sum(examples[i].loss_mask[1:]) for i in picks]
  assert len(set(counts)) == len(counts)
  whole, _ = _batch([examples[i] for i in picks], False)

  want = grad_mean(params, *(whole[f] for f in fields))
  sums = [grad_sum(params, *(m[f] for f in fields)) for m in micro]
  accumulated = jax.tree.map(lambda *g: sum(g) / sum(counts), *sums)
  mean_of_means = jax.tree.map(lambda *g: sum(x / n for x, n in zip(g, counts)) / len(g), *sums)
  leaves = zip(jax.tree.leaves(want), jax.tree.leaves(accumulated), jax.tree.leaves(mean_of_means))
  worst_mom = 0.0
  for w, acc, mom in leaves:
    np.testing.assert_allclose(acc, w, rtol=1e-4, atol=1e-7)
    worst_mom = max(worst_mom, float(jnp.max(jnp.abs(mom - w)) / (jnp.max(jnp.abs(w)) + 1e-12)))
  assert worst_mom > 1e-2  # averaging per-batch means weighs short examples' tokens up
