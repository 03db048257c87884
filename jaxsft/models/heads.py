"""Task heads on the decoder: sequence classification and reward models.

Axis legend: B batch, T time, S scored sequences per row, D model width,
C labels (``cfg.num_labels``), K labels per example.

A head model is the decoder with a ``score/kernel_dc`` [D, C] projection in
place of the lm_head (``llama.ScoreHead``), as transformers'
``LlamaForSequenceClassification`` / ``Qwen2ForSequenceClassification`` /
``MistralForSequenceClassification`` are. A sequence is scored at its last
token. ``cfg.problem_type`` says what the C scores mean:

  single_label_classification   softmax over the labels; cross-entropy
  multi_label_classification    one sigmoid per label (transformers'
                                BCEWithLogitsLoss, mean over labels); an
                                example is right when every label is
  regression                    C = 1: a reward. Pairs train with
                                ``-log σ(r_chosen − r_rejected)``

Training batches are packed rows of several sequences (``packing.
fill_head_rows``): each sequence is its own segment (attention and positions
restart), so its last token's hidden state is exactly what it would be alone,
and ``pool_index`` [B, S] lists those tokens. Inference on padded batches
(``sequence_logits``) pools like transformers: at the rightmost token that is
not ``pad_token_id``, which works for left and right padding alike.

Losses return ``(loss_sum, example_count, sums)`` like the token losses: the
caller divides once, so gradient accumulation averages over all examples.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import losses
from jaxsft import sharding as sharding_lib
from jaxsft.models import llama
from jaxsft.models.model_config import ModelConfig

OBJECTIVES = ("cls", "reward")

# Per objective, the metrics a step reports: name -> (numerator, denominator)
# among the sums ``head_loss`` returns.
METRICS = {
    "cls": {"accuracy": ("correct", "examples")},
    "reward": {"pairwise_accuracy": ("correct", "examples"), "margin": ("margin", "examples")},
}


# ----------------------------------------------------------------------------- config and params

def head_config(cfg: ModelConfig, objective: str, label_names=(), multi_label: bool = False,
                pad_token_id: int | None = None) -> ModelConfig:
  """``cfg`` with the head ``objective`` needs; a head it already has is kept
  (and must be the same kind)."""
  if objective == "reward":
    want = dict(num_labels=1, label_names=(), problem_type="regression")
  else:
    if not label_names:
      raise ValueError("a classification head needs at least one label")
    kind = "multi" if multi_label else "single"
    want = dict(num_labels=len(label_names), label_names=tuple(label_names),
                problem_type=f"{kind}_label_classification")
  if cfg.has_head:
    # Rows with one label each also train a multi-label head.
    compatible = cfg.problem_type == want["problem_type"] or (
        cfg.problem_type == "multi_label_classification" and not multi_label
        and objective == "cls")
    if not compatible or cfg.num_labels != want["num_labels"]:
      raise ValueError(
          f"the model already has a {cfg.problem_type} head of {cfg.num_labels} label(s); "
          f"objective {objective!r} on this data needs a {want['problem_type']} head of "
          f"{want['num_labels']}: start the stage from a causal LM instead")
    return cfg
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else pad_token_id
  return cfg.replace(pad_token_id=pad, **want)


def attach(cfg: ModelConfig, params, head_cfg: ModelConfig, rng: jax.Array, mesh=None):
  """Parameters for ``head_cfg``: those of ``params`` (a causal LM of ``cfg``)
  without the lm_head, plus a new score head drawn from
  normal(initializer_range), as transformers initializes it, placed by the
  sharding rules on ``mesh``. Abstract params (``ShapeDtypeStruct``s, for a
  resumed stage) give abstract params."""
  if cfg.has_head:
    return params
  params = {k: v for k, v in params.items() if k != "lm_head"}
  shape = (head_cfg.hidden_size, head_cfg.num_labels)
  dtype = jnp.dtype(head_cfg.param_dtype)
  abstract = jax.ShapeDtypeStruct(shape, dtype)
  if isinstance(params["final_norm"]["scale_d"], jax.ShapeDtypeStruct):
    kernel = abstract
  else:
    init = lambda k: (head_cfg.initializer_range * jax.random.normal(k, shape)).astype(dtype)  # noqa: E731
    out = None
    if mesh is not None:
      out = sharding_lib.param_shardings({"score": {"kernel_dc": abstract}}, mesh)
      out = out["score"]["kernel_dc"]
    kernel = jax.jit(init, out_shardings=out)(rng)
  return {**params, "score": {"kernel_dc": kernel}}


# ----------------------------------------------------------------------------- scores

def _score(cfg: ModelConfig, params, hidden):
  """fp32 scores [..., C] of hidden states [..., D] (inputs in the compute dtype)."""
  dt = jnp.dtype(cfg.dtype)
  w = params["score"]["kernel_dc"]
  return jnp.einsum("...D,DC->...C", hidden.astype(dt), w.astype(dt),
                    preferred_element_type=jnp.float32)


def last_token_index(tokens: jax.Array, pad_token_id: int | None) -> jax.Array:
  """[B] index of each row's rightmost token that is not ``pad_token_id``
  (transformers' rule; 0 for an all-padding row, the last column without a pad id)."""
  if pad_token_id is None:
    return jnp.full(tokens.shape[:1], tokens.shape[1] - 1, jnp.int32)
  columns = jnp.arange(tokens.shape[1], dtype=jnp.int32)
  return jnp.argmax(columns * (tokens != pad_token_id), axis=-1).astype(jnp.int32)


def sequence_logits(cfg: ModelConfig, params, tokens, attention_mask=None) -> jax.Array:
  """fp32 scores [B, C] of padded rows, as transformers' *ForSequenceClassification
  computes them: ``attention_mask`` (default: tokens != pad) marks real tokens,
  which are positioned 0, 1, … whatever the padding side; each row is pooled at
  its rightmost non-pad token."""
  if not cfg.has_head:
    raise ValueError("this model has no score head (num_labels=0): it is a causal LM")
  tokens = jnp.asarray(tokens)
  if attention_mask is None:
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else -1
    attention_mask = tokens != pad
  mask = jnp.asarray(attention_mask).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  hidden, _ = llama.hidden_states(cfg, params, tokens, positions, mask)
  index = last_token_index(tokens, cfg.pad_token_id)
  pooled = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
  return _score(cfg, params, pooled)


def pooled_logits(cfg: ModelConfig, params, batch,
                  dropout_rng=None) -> tuple[jax.Array, jax.Array, Any]:
  """(scores [B, S, C], valid [B, S], aux) of the sequences of packed rows;
  ``dropout_rng`` turns on adapter dropout (``llama.hidden_states``)."""
  hidden, aux = llama.hidden_states(cfg, params, batch["tokens"], batch["positions"],
                                    batch["segment_ids"], dropout_rng=dropout_rng)
  index = batch["pool_index"]
  pooled = jnp.take_along_axis(hidden, jnp.maximum(index, 0)[..., None], axis=1)
  return _score(cfg, params, pooled), index >= 0, aux


# ----------------------------------------------------------------------------- losses

def head_loss(cfg: ModelConfig, params, batch, objective: str, dropout_rng=None):
  """(loss_sum, example_count, sums, aux) of packed rows (module doc);
  ``dropout_rng`` (training) turns on adapter dropout, as for token losses.

  ``sums`` hold the numerators and denominators of ``METRICS[objective]``.
  cls: ``batch["labels"]`` [B, S, K] are label ids, -1 padded; id C marks a
  label the model does not have (evaluation data): such examples count as
  wrong and carry no loss. reward: slots 2j, 2j+1 are a pair.
  """
  logits, valid, aux = pooled_logits(cfg, params, batch, dropout_rng)
  if objective == "reward":
    r = logits[..., 0]
    ok = valid[:, 0::2] & valid[:, 1::2]
    loss_sum, count, margin_sum, correct = losses.pairwise_loss(r[:, 0::2], r[:, 1::2], ok)
    return loss_sum, count, {"correct": correct, "examples": count, "margin": margin_sum}, aux

  c = cfg.num_labels
  labels = batch["labels"]
  unseen = jnp.any(labels >= c, axis=-1)
  trained = valid & ~unseen
  w = trained.astype(jnp.float32)
  if cfg.problem_type == "multi_label_classification":
    target = jnp.clip(jnp.sum(jax.nn.one_hot(labels, c, dtype=jnp.float32), axis=-2), 0, 1)
    # BCE with logits, the mean over labels per example (transformers' mean over all).
    per = jnp.mean(jax.nn.softplus(logits) - target * logits, axis=-1)
    right = jnp.all((logits > 0) == (target > 0), axis=-1)
  else:
    target = jnp.clip(labels[..., 0], 0, c - 1)
    logz = jax.nn.logsumexp(logits, axis=-1)
    per = logz - jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    right = jnp.argmax(logits, axis=-1) == target
  count = jnp.sum(w)
  sums = {"correct": jnp.sum(w * right), "examples": jnp.sum(valid.astype(jnp.float32))}
  return jnp.sum(w * per), count, sums, aux


def predictions(cfg: ModelConfig, logits) -> list[list[int]]:
  """Predicted label ids per row of scores [B, C]: the argmax, or every label
  whose sigmoid passes 0.5 for a multi-label head."""
  logits = np.asarray(logits)
  if cfg.problem_type == "multi_label_classification":
    return [np.flatnonzero(row > 0).tolist() for row in logits]
  return [[int(np.argmax(row))] for row in logits]
