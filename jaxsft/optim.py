"""Optimizers: AdamW with warmup + decay schedules, decay masks and parameter labels.

Trainable and frozen parameters are told apart by a label tree (one label per
leaf, derived from the stage's method by path rules); ``optax.multi_transform``
applies a transformation per label. With method ``full`` every weight carries
the label ``"train"``, or a per-group label when a stage's ``lr_groups`` gives
its path a learning-rate multiplier (e.g. ``{"embed|lm_head": 0.1}``); other
methods freeze most weights (``jaxsft.peft.methods``), and frozen weights are
split off before differentiation (``partition``), so they cost no gradient
computation and no optimizer state.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import numpy as np
import jax.numpy as jnp
import optax

from jaxsft import sharding as sharding_lib
from jaxsft.peft import methods as peft_methods


def schedule(stage, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``stage.lr`` (by ratio or steps), then cosine/linear/constant
  decay to ``min_lr_ratio`` x lr at ``total_steps``."""
  warmup = stage.warmup_steps if stage.warmup_steps is not None else int(
      round(stage.warmup_ratio * total_steps))
  warmup = min(warmup, max(total_steps - 1, 0))
  peak, floor = stage.lr, stage.lr * stage.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if stage.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=stage.min_lr_ratio)
  elif stage.schedule == "linear":
    decay = optax.linear_schedule(peak, floor, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  # Warmup starts above zero so the first step already moves the weights.
  return optax.join_schedules(
      [optax.linear_schedule(peak / warmup, peak, warmup - 1), decay], [warmup - 1])


# Suffix of the labels of LoRA+'s B factors (``labels``).
LORAPLUS = "+loraplus"


def decay_mask(params):
  """True where weight decay applies: matrices, not norm scales or biases."""
  def rule(path, x):
    name = sharding_lib.path_names(path)[-1]
    return not (name.startswith("scale_") or "_bias_" in name)
  return jax.tree_util.tree_map_with_path(rule, params)


def labels(params, stage) -> Any:
  """The label of every parameter: ``"frozen"`` where the stage's method does
  not train it (``jaxsft.peft.methods.trainable``) and for MoE routers with
  ``stage.freeze_router``, else ``"group:<pattern>"`` for the first
  ``lr_groups`` pattern (a regex searched in the checkpoint path, e.g.
  ``"layers/attn/q_dnh"``) that matches it, else ``"train"``. With LoRA+
  (``peft.loraplus_lr_ratio``) the B factors' labels end in ``LORAPLUS``."""
  patterns = list(stage.lr_groups or {})
  lora = peft_methods.has_lora(params)
  peft = stage.get("peft")
  loraplus = (peft is not None and stage.method in peft_methods.LORA_METHODS
              and peft.get("loraplus_lr_ratio") is not None)
  freeze_router = bool(stage.get("freeze_router", False))
  routers = []

  def label(path, _):
    names = sharding_lib.path_names(path)
    name = peft_methods.canonical_path(names)
    if "moe/router_de" in name:
      routers.append(name)
      if freeze_router:
        return "frozen"
    if not peft_methods.trainable(names, stage.method, peft, lora):
      return "frozen"
    out = next((f"group:{p}" for p in patterns if re.search(p, name)), "train")
    return out + LORAPLUS if loraplus and "_lora_b_" in names[-1] else out

  tree = jax.tree_util.tree_map_with_path(label, params)
  taken = {x.removesuffix(LORAPLUS) for x in jax.tree_util.tree_leaves(tree)}
  idle = [p for p in patterns if f"group:{p}" not in taken]
  # (full_then_lora's two phases train different parameters: a pattern may
  # be meant for one of them.)
  if idle and stage.method != "full_then_lora":
    trained = sorted({peft_methods.canonical_path(sharding_lib.path_names(path))
                      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                      if x != "frozen"})
    raise ValueError(f"stage.lr_groups: {idle[0]!r} matches no parameter that the stage "
                     f"trains (method {stage.method}) and no earlier pattern takes, so it would "
                     f"change nothing; the trained parameters are {trained[:6]}"
                     f"{' …' if len(trained) > 6 else ''}")
  if freeze_router and not routers:
    raise ValueError("stage.freeze_router=True, but the model has no MoE router to freeze "
                     "(it is not a mixture of experts); remove freeze_router")
  return tree


def _is_trained(label_tree) -> Any:
  return jax.tree_util.tree_map(lambda label: label != "frozen", label_tree)


def trainable_mask(params, stage) -> Any:
  """True for every parameter that trains in this stage."""
  return _is_trained(labels(params, stage))


def partition(params, mask) -> tuple[Any, Any]:
  """Split ``params`` into (trainable, frozen) trees of the same structure, the
  other side's leaves replaced by ``optax.MaskedNode()`` (an empty node, so
  gradients and optimizer state exist for trainable leaves only)."""
  train = jax.tree_util.tree_map(lambda p, m: p if m else optax.MaskedNode(), params, mask)
  frozen = jax.tree_util.tree_map(lambda p, m: optax.MaskedNode() if m else p, params, mask)
  return train, frozen


def frozen_dtype(stage, compute_dtype, param_dtype):
  """The dtype a stage holds its frozen parameters in, or None (as they are).

  ``stage.peft.frozen_dtype``: ``"compute"`` holds them in the compute dtype
  (``model.dtype``): the forward pass reads every weight in that dtype anyway
  (norm scales and biases included), so the step computes exactly the same,
  and an 8B LoRA stage keeps 15 GiB of bf16 base weights instead of 30 GiB of
  fp32. ``"param"`` keeps the parameter dtype (the final checkpoint's frozen
  weights then equal the incoming ones bit for bit, not only their compute-dtype
  rounding). ``"auto"``: ``"compute"`` on GPU/TPU, ``"param"`` on CPU, where
  XLA computes bf16 matmuls in fp32 and would hoist fp32 copies of the stored
  bf16 weights out of the layer loop.
  """
  choice = peft_methods.frozen_dtype_choice(stage.get("peft"))
  if choice == "param" or (choice == "auto" and sharding_lib.compute_platform() == "cpu"):
    return None
  dt, pdt = jnp.dtype(compute_dtype), jnp.dtype(param_dtype)
  return dt if dt.itemsize < pdt.itemsize else None


def load_dtypes(params, stage, compute_dtype, param_dtype) -> Any:
  """The dtype to read each leaf of the base model ``params`` (abstract is
  fine) in when ``stage`` starts from it: ``frozen_dtype`` for the weights the
  stage freezes, the leaf's own dtype for the rest.

  Why: a frozen weight read in the parameter dtype is cast down by
  ``store_frozen`` before the first step anyway, so reading it straight in the
  compute dtype gives the same state without first holding the whole model in
  fp32 on the device (an 8B LoRA run: 30 GiB there instead of the 15 GiB it
  trains in). ``full_then_lora`` freezes nothing before its switch."""
  dtype = frozen_dtype(stage, compute_dtype, param_dtype)
  if dtype is None:
    return jax.tree_util.tree_map(lambda x: jnp.dtype(x.dtype), params)
  return jax.tree_util.tree_map(
      lambda x, trained: jnp.dtype(x.dtype) if trained or not jnp.issubdtype(
          x.dtype, jnp.floating) else dtype, params, trainable_mask(params, stage))


def store_frozen(params, mask, dtype) -> Any:
  """``params`` with the frozen (``mask`` False) floating leaves cast to
  ``dtype`` (None: unchanged). Leaf by leaf, each original donated, so the
  peak is the incoming tree plus one cast leaf; works on abstract leaves too."""
  if dtype is None:
    return params
  cast = jax.jit(lambda x: x.astype(dtype), donate_argnums=0)

  def store(x, trained):
    if trained or not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):  # a leaf kept on the host (QLoRA's) stays there
      return x.astype(dtype)
    return cast(x)
  return jax.tree_util.tree_map(store, params, mask)


def combine(train, frozen) -> Any:
  """Inverse of ``partition``."""
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return jax.tree_util.tree_map(lambda a, b: b if masked(a) else a, train, frozen,
                                is_leaf=masked)


def lr_scale(stage, params) -> float:
  """The multiplier of the whole schedule: ``peft.lora_lr_scale`` in the LoRA
  phase of ``full_then_lora`` (``params`` hold LoRA factors), else 1."""
  if stage.method == "full_then_lora" and peft_methods.has_lora(params):
    return float(stage.peft.lora_lr_scale)
  return 1.0


def build(stage, total_steps: int, params, compute_dtype=None
          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping, then AdamW per label: the stage's lr for ``train``,
  scaled by the group's multiplier for each ``lr_groups`` entry and by
  ``peft.loraplus_lr_ratio`` for LoRA+'s B factors. The transformation applies
  to the trainable part of ``params`` only (see ``partition``): frozen
  parameters get neither gradients nor optimizer state. The returned schedule
  is the lr of ``train`` parameters (``peft.lora_lr_scale`` included).
  With ``compute_dtype`` float16 the whole is wrapped in ``dynamic_loss_scale``."""
  base, scale = schedule(stage, total_steps), lr_scale(stage, params)
  lr = base if scale == 1.0 else (lambda step: scale * base(step))
  groups = dict(stage.lr_groups or {})
  label_tree = labels(params, stage)
  mask = _is_trained(label_tree)
  train, _ = partition(params, mask)
  train_labels, _ = partition(label_tree, mask)
  used = set(jax.tree_util.tree_leaves(train_labels))

  def multiplier(label: str) -> float:
    group = label.removesuffix(LORAPLUS)
    m = float(groups[group[len("group:"):]]) if group.startswith("group:") else 1.0
    return m * float(stage.peft.loraplus_lr_ratio) if label.endswith(LORAPLUS) else m

  def adamw(scale: float):
    rate = lr if scale == 1.0 else (lambda step: scale * lr(step))
    return optax.adamw(rate, b1=stage.b1, b2=stage.b2, eps=stage.eps,
                       weight_decay=stage.weight_decay, mask=decay_mask(train))

  # multi_transform wants a transformation for every label in the tree.
  transforms = {label: adamw(multiplier(label)) for label in sorted(used | {"train"})}
  tx = optax.chain(
      optax.clip_by_global_norm(stage.grad_clip) if stage.grad_clip else optax.identity(),
      optax.multi_transform(transforms, train_labels))
  if compute_dtype is not None and jnp.dtype(compute_dtype) == jnp.float16:
    tx = dynamic_loss_scale(tx, float(stage.loss_scale), int(stage.loss_scale_interval))
  return tx, lr


class LossScaleState(NamedTuple):
  """``dynamic_loss_scale``'s state: the wrapped transformation's, the scale
  the next step's loss is multiplied by, and the finite steps in a row since
  it last changed (torch.amp.GradScaler's ``growth_tracker``)."""
  inner: Any
  scale: jax.Array
  good_steps: jax.Array
  skipped: jax.Array  # steps skipped so far


def dynamic_loss_scale(tx: optax.GradientTransformation, init_scale: float,
                       growth_interval: int, factor: float = 2.0
                       ) -> optax.GradientTransformation:
  """float16 training's loss scaling around ``tx``, with torch.amp.GradScaler's
  rule. The train step multiplies the loss by ``loss_scale(state)`` and
  divides the gradients by it before they get here; gradients with an inf or
  NaN (an fp16 overflow in the backward pass) leave the weights and ``tx``'s
  state as they were and divide the scale by ``factor``; after
  ``growth_interval`` finite steps in a row the scale is multiplied by it.

  Why: float16 keeps 5 exponent bits. Small gradients of the loss underflow to
  zero unless the loss is scaled up, and too large a scale overflows; the
  scale that works drifts during training, so it is found as it goes."""
  def init(params):
    zero = jnp.zeros((), jnp.int32)
    return LossScaleState(tx.init(params), jnp.asarray(init_scale, jnp.float32), zero, zero)

  def update(grads, state, params=None):
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g))
                                  for g in jax.tree_util.tree_leaves(grads)]))
    updates, inner = tx.update(grads, state.inner, params)
    updates = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    inner = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), inner,
                                   state.inner)
    good = jnp.where(finite, state.good_steps + 1, 0)
    grow = good >= growth_interval
    grown = state.scale * factor
    scale = jnp.where(finite,
                      jnp.where(grow & jnp.isfinite(grown), grown, state.scale),
                      state.scale / factor)
    return updates, LossScaleState(inner, scale, jnp.where(grow, 0, good),
                                   state.skipped + (~finite).astype(jnp.int32))

  return optax.GradientTransformation(init, update)


def loss_scale(opt_state) -> jax.Array | None:
  """The loss scale of a ``dynamic_loss_scale`` state (None for any other)."""
  return opt_state.scale if isinstance(opt_state, LossScaleState) else None


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))
