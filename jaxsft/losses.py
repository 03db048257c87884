"""Token-level losses that never materialize the full [B, T, V] fp32 logits.

Axis legend: B batch, T time, D model width, V vocab, C chunks, U time steps
per chunk.

Every loss returns ``(loss_sum, token_count)`` and leaves the division to the
caller, so gradient accumulation and multi-host reductions average over the
true global token count instead of averaging per-batch means.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import sharding


# Time steps per chunk. A chunk's logits are B × DEFAULT_CHUNK_SIZE × V fp32:
# with a per-device batch of 8 and Qwen's 152k vocab that is 0.6 GB, instead of
# 10 GB for the whole of a 2048-token row.
DEFAULT_CHUNK_SIZE = 128


def next_token_targets(tokens: jax.Array, segment_ids: jax.Array | None = None,
                       loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Targets and weights [B, T] for predicting token t+1 from positions ≤ t.

  Position t is trained only when tokens t and t+1 belong to the same non-zero
  segment, so a packed row never predicts across an example boundary and
  nothing is predicted from or into padding (segment 0). ``loss_mask`` [B, T]
  (optional) marks which *target* tokens count, e.g. the answer tokens of an
  instruction example; the weight of position t is ``loss_mask[t+1]``.
  The last position has no target: its target is 0 with weight 0.
  """
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  next_segment = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
  weights = (segment_ids != 0) & (next_segment == segment_ids)
  weights = weights.astype(jnp.float32)
  if loss_mask is not None:
    weights = weights * jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
  return targets.astype(jnp.int32), weights


def masked_cross_entropy(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array,
                         weights: jax.Array, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         vocab_major: bool = False) -> tuple[jax.Array, jax.Array]:
  """Weighted next-token cross-entropy from final hidden states, chunked over time.

  ``hidden`` [B,T,D] are the final-norm hidden states, ``unembedding`` [D,V] the
  output projection (``llama.unembedding``), or [V,D] with ``vocab_major``
  (a tied embedding as stored, ``llama.output_projection``: its gradient is
  then accumulated in that layout, not transposed after), ``targets`` [B,T] token ids and
  ``weights`` [B,T] per-position weights (0 = not trained; such targets may be
  any value, e.g. -100). Logits are computed in fp32 (inputs in ``hidden``'s
  dtype, as the model's own logits are), ``chunk_size`` time steps at a time,
  so memory holds one chunk's B × chunk_size × V logits rather than all of them.

  The gradient is computed in the same pass (``_chunked_loss``): a chunk's
  logits are used for the loss and for d loss/d logits = weight · (softmax −
  onehot) at once, so the backward pass neither keeps nor recomputes them.

  Returns ``(loss_sum, token_count)``: Σ weight·(−log p(target)) and Σ weight.
  """
  b, t, d = hidden.shape
  v = unembedding.shape[0 if vocab_major else 1]
  assert unembedding.shape[1 if vocab_major else 0] == d, (hidden.shape, unembedding.shape,
                                                           vocab_major)
  assert targets.shape == weights.shape == (b, t), (targets.shape, weights.shape, hidden.shape)
  weights = weights.astype(jnp.float32)
  # Ignored positions may carry any label; clipping keeps the gather in range
  # (an out-of-range gather fills NaN, and 0 · NaN is still NaN).
  targets = jnp.clip(targets, 0, v - 1).astype(jnp.int32)

  # Chunks run along time, not along flattened B·T rows: the batch axis keeps
  # whatever data/fsdp sharding it has, and every device works on its own rows
  # in each chunk instead of the chunks being spread across devices serially.
  u = max(1, min(chunk_size, t))
  c = -(-t // u)
  pad = c * u - t
  count = jnp.sum(weights)
  if c > 1:
    # Prompts, padding and the last slot carry weight 0, often a quarter to
    # a half of an SFT row. Each row's trained positions move to its front (a
    # stable reordering; the loss is a sum, so order does not matter), and the
    # chunk loop stops after the last chunk in which any row still has a
    # trained position (a while loop over that prefix): the chunks after it
    # run no vocab matmuls at all. On a GPU the loop's trip count is read back
    # by the host once per chunk, a few microseconds against a chunk's
    # milliseconds of matmuls.
    order = jnp.argsort(weights == 0, axis=1, stable=True)
    hidden = _permute_time(hidden, order)
    targets = jnp.take_along_axis(targets, order, axis=1)
    weights = jnp.take_along_axis(weights, order, axis=1)
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  hidden_c = hidden.reshape(b, c, u, d).swapaxes(0, 1)  # [C,B,U,D]
  targets_c = targets.reshape(b, c, u).swapaxes(0, 1)
  weights_c = weights.reshape(b, c, u).swapaxes(0, 1)
  loss_sum = _chunked_loss(hidden_c, unembedding, targets_c, weights_c, vocab_major)
  return loss_sum, count


@jax.custom_vjp
def _permute_time(x, order):
  """``x`` [B,T,D] with each row's time steps taken in ``order`` [B,T] (a
  permutation); its gradient is the inverse permutation, a gather rather
  than autodiff's scatter-add (slow on CPU)."""
  return jnp.take_along_axis(x, order[..., None], axis=1)


def _permute_time_fwd(x, order):
  return _permute_time(x, order), order


def _permute_time_bwd(order, dy):
  inverse = jnp.argsort(order, axis=1)
  return (jnp.take_along_axis(dy, inverse[..., None], axis=1),
          np.zeros(order.shape, jax.dtypes.float0))


_permute_time.defvjp(_permute_time_fwd, _permute_time_bwd)


def _chunk_nll(h, w, tgt, vocab_major):
  """fp32 logits [B,U,V] of one chunk, their logsumexp and the per-token −log p."""
  spec = "BUD,VD->BUV" if vocab_major else "BUD,DV->BUV"
  logits = jnp.einsum(spec, h, w.astype(h.dtype), preferred_element_type=jnp.float32)
  logz = _logsumexp(logits) if sharding.compute_platform() == "gpu" else jax.nn.logsumexp(
      logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
  return logits, logz, logz - target_logit


def _logsumexp(x):
  """logsumexp over the last axis in one pass over ``x`` (fp32, finite).

  ``jax.nn.logsumexp`` reads the chunk's fp32 logits twice (its max, then
  the sum of exponentials below it); on a GPU each pass is a memory-bound
  kernel over 0.5 GB per 1024 tokens of a 128k vocabulary. One reduction of
  (running max, sum of exp(x − running max)) pairs reads them once. On a CPU
  the two exponentials per element cost more than the second read saves
  (40-50% slower there), so only the GPU takes it (``_chunk_nll``)."""
  def combine(a, b):
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    # exp(-inf - -inf) is NaN: an identity element contributes 0 itself.
    part = lambda mi, si: jnp.where(si == 0, 0.0, si * jnp.exp(mi - m))  # noqa: E731
    return m, part(m1, s1) + part(m2, s2)

  m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.array(-jnp.inf, x.dtype), jnp.array(0, x.dtype)),
                        combine, (x.ndim - 1,))
  return m + jnp.log(s)


def _trained_chunks(weights_c):
  """How many leading chunks [C,B,U] to compute (each row's trained positions
  reordered to its front by ``masked_cross_entropy``): those up to the last
  one that any row still trains in; None, meaning all of them, for a single
  chunk (no loop to stop early)."""
  if weights_c.shape[0] == 1:
    return None
  return jnp.sum(jnp.any(weights_c != 0, axis=(1, 2)), dtype=jnp.int32)


def _scan_prefix(body, init, xs, n):
  """``lax.scan(body, init, xs)`` over only the first ``n`` (traced) entries
  of ``xs``' leading axis, or over all of them if ``n`` is None. The stacked
  outputs of the entries not run are zeros.

  A while loop rather than a ``lax.cond`` per entry: a conditional's branches
  take the carry (the loss's fp32 [D,V] output-layer gradient) as operands,
  and XLA copies it into and out of the conditional on every trip, 1 GB per
  chunk for a 128k vocabulary. The loop updates it in place.
  """
  if n is None:
    return jax.lax.scan(body, init, xs)
  first = jax.tree.map(lambda a: a[0], xs)
  out_shapes = jax.eval_shape(lambda carry, x: body(carry, x)[1], init, first)
  size = jax.tree.leaves(xs)[0].shape[0]
  outs = jax.tree.map(lambda o: jnp.zeros((size, *o.shape), o.dtype), out_shapes)

  def step(state):
    i, carry, outs = state
    x = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), xs)
    carry, out = body(carry, x)
    outs = jax.tree.map(lambda buf, o: jax.lax.dynamic_update_index_in_dim(buf, o, i, 0),
                        outs, out)
    return i + 1, carry, outs

  _, carry, outs = jax.lax.while_loop(lambda state: state[0] < n, step,
                                      (jnp.zeros((), jnp.int32), init, outs))
  return carry, outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_loss(hidden_c, w, targets_c, weights_c, vocab_major):
  """Σ weight·nll over chunks [C,B,U,...]; the forward-only path (evaluation).
  The chunks after the last trained one are not computed."""
  def body(total, chunk):
    h, tgt, wt = chunk
    return total + jnp.sum(wt * _chunk_nll(h, w, tgt, vocab_major)[2]), None

  total, _ = _scan_prefix(body, jnp.zeros((), jnp.float32), (hidden_c, targets_c, weights_c),
                          _trained_chunks(weights_c))
  return total


def _chunked_loss_fwd(hidden_c, w, targets_c, weights_c, vocab_major):
  """The loss and, in the same scan, its gradients (the residuals).

  d loss/d logits = weight · (softmax − onehot(target)), cast to the compute
  dtype for the two matmuls that follow (as autocast does in PyTorch; in fp32
  this is exactly what autodiff computes): d hidden = g·Wᵀ per chunk, and
  d W = Σ_chunks hᵀ·g accumulated in fp32. d W is computed only when W is being
  differentiated (not for a frozen output layer, e.g. under LoRA); d weights
  (the per-token nll) only when they are, and then for every chunk.
  """
  need_w, need_wt = w.perturbed, weights_c.perturbed
  hidden_c, w, targets_c, weights_c = (x.value for x in (hidden_c, w, targets_c, weights_c))
  dt = hidden_c.dtype
  wc = w.astype(dt)
  v = w.shape[0 if vocab_major else 1]

  def body(carry, chunk):
    total, dw = carry
    h, tgt, wt = chunk
    logits, logz, nll = _chunk_nll(h, wc, tgt, vocab_major)
    probs = jnp.exp(logits - logz[..., None])
    hit = jnp.arange(v, dtype=jnp.int32) == tgt[..., None]
    g = (wt[..., None] * jnp.where(hit, probs - 1.0, probs)).astype(dt)
    dh = jnp.einsum("BUV,VD->BUD" if vocab_major else "BUV,DV->BUD", g, wc,
                    preferred_element_type=jnp.float32).astype(dt)
    if need_w:
      dw = dw + jnp.einsum("BUV,BUD->VD" if vocab_major else "BUV,BUD->DV", g, h,
                           preferred_element_type=jnp.float32)
    return (total + jnp.sum(wt * nll), dw), (dh, nll if need_wt else None)

  dw0 = jnp.zeros(w.shape if need_w else (), jnp.float32)
  # The per-token nll of every chunk is d loss/d weights: none can be skipped.
  n = None if need_wt else _trained_chunks(weights_c)
  (total, dw), (dh_c, nll_c) = _scan_prefix(
      body, (jnp.zeros((), jnp.float32), dw0), (hidden_c, targets_c, weights_c), n)
  return total, (dh_c, dw.astype(w.dtype) if need_w else None, nll_c, targets_c)


def _chunked_loss_bwd(vocab_major, residuals, ct):
  del vocab_major  # the residuals are in w's own layout
  dh_c, dw, nll_c, targets_c = residuals
  if isinstance(ct, jax.custom_derivatives.SymbolicZero):
    ct = jnp.zeros((), jnp.float32)
  int_zero = np.zeros(targets_c.shape, jax.dtypes.float0)
  return ((ct * dh_c).astype(dh_c.dtype),
          None if dw is None else (ct * dw).astype(dw.dtype),
          int_zero,
          None if nll_c is None else ct * nll_c)


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd, symbolic_zeros=True)


def pairwise_loss(chosen: jax.Array, rejected: jax.Array, valid: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The reward model's pairwise loss over pairs of scores (any equal shapes).

  Returns ``(loss_sum, pair_count, margin_sum, correct)``: Σ −log σ(r_chosen −
  r_rejected) over the ``valid`` pairs (computed as softplus(−margin), which
  stays finite for any margin), their number, Σ (r_chosen − r_rejected), and
  how many pairs score the chosen answer higher.
  """
  w = valid.astype(jnp.float32)
  margin = (chosen - rejected).astype(jnp.float32)
  return (jnp.sum(w * jax.nn.softplus(-margin)), jnp.sum(w), jnp.sum(w * margin),
          jnp.sum(w * (margin > 0)))
