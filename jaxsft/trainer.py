"""One training run: the stage pipeline, and the loop of one stage.

Per stage: build the data stream, the optimizer and the jitted step; restore
the latest checkpoint of the stage if there is one; loop (log, evaluate,
checkpoint); write the stage's final model checkpoint, which the next stage
starts from and which is never rotated away.

Layout of a run directory:
  config.json               the resolved config
  metrics.jsonl, loss.png   one JSON object per logged step (train and eval rows, an
                            eval row with each eval dataset's figures under "datasets";
                            a head stage's eval labels unseen in training and the
                            examples each dataset lost to tokenizing: split "data";
                            each compiled step's time and memory: split "compile";
                            best_metric's new bests and early stop: "best", "early_stop")
  stages/NAME/checkpoints/  orbax CheckpointManager: state + data position, every N steps
  stages/NAME/best/         with best_metric: the best evaluation's model and its record
                            (a stage that trains part of the model, e.g. LoRA: its
                            trained parameters alone, trained/, the base being frozen)
  stages/NAME/lora_init/    a PiSSA/OLoRA stage's factors as they started (a PEFT adapter
                            directory), for export --peft --pissa-convert
  stages/NAME/final/        the stage's final model (jaxsft.checkpoint format): the last
                            weights, or with best_metric the best evaluation's
  hf/                       Hugging Face export, when config.export.hf
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft import aot
from jaxsft import checkpoint as checkpoint_lib
from jaxsft import config as config_lib
from jaxsft import evaluate as evaluate_lib
from jaxsft import hf, losses, metrics, optim
from jaxsft import selection as selection_lib
from jaxsft import sharding as sharding_lib
from jaxsft.data import pipeline as data_pipeline
from jaxsft.data import templates as data_templates
from jaxsft.models import heads, llama, mixtral
from jaxsft.models.model_config import PRINCIPAL_INITS, ModelConfig
from jaxsft.peft import export as peft_export
from jaxsft.peft import methods as peft_methods
from jaxsft.peft import nf4

log = logging.getLogger("jaxsft")

BATCH_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")
GENERATIONS_DIR = "generations"  # per stage: generate_eval's answers, one file per evaluation
BEST_DIR = "best"  # per stage with best_metric: the weights of its best evaluation
BEST_TRAINED_DIR = "trained"  # in BEST_DIR: a partially trained stage's trained leaves
# Task heads score whole sequences: no loss mask, the scored tokens instead.
HEAD_BATCH_KEYS = {"cls": ("tokens", "segment_ids", "positions", "pool_index", "labels"),
                   "reward": ("tokens", "segment_ids", "positions", "pool_index")}


def batch_keys(objective: str) -> tuple[str, ...]:
  """The arrays a batch of ``objective`` holds."""
  return HEAD_BATCH_KEYS.get(objective, BATCH_KEYS)


class TrainingDiverged(ValueError):
  """The loss became NaN or infinite."""


class CheckpointSaveFailed(ValueError):
  """Writing a checkpoint failed (e.g. the disk is full); earlier ones are intact."""


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds besides the data position. ``rng`` is a raw
  uint32 key, split every step, so anything random (dropout, sampling during
  evaluation) resumes exactly."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_state(params, tx: optax.GradientTransformation, seed: int, trainable=None) -> TrainState:
  """Step 0: the optimizer state covers the ``trainable`` parameters only (a
  bool tree, as ``optim.trainable_mask``; None: all)."""
  train = params if trainable is None else optim.partition(params, trainable)[0]
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(train), jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------- the step

def stage_loss(cfg: ModelConfig, params, batch, objective: str = "sft", dropout_rng=None):
  """(value to differentiate, (loss_sum, count, aux)) of one micro-batch.

  lm / sft: the summed token loss over the token count; cls / reward: the
  summed head loss over the example (pair) count, with the sums of the head's
  metrics in ``aux`` (``heads.head_loss``). For MoE models the load-balancing
  loss is added, scaled by the count, so that dividing the accumulated
  gradient by the total count gives transformers'
  ``loss + router_aux_loss_coef * aux_loss`` in expectation.
  """
  if objective in heads.OBJECTIVES:
    loss_sum, count, sums, aux = heads.head_loss(cfg, params, batch, objective,
                                                 dropout_rng=dropout_rng)
    aux = {**aux, **sums}
  else:
    # A batch without segment ids / positions is one example per row, no padding.
    segment_ids = batch.get("segment_ids")
    hidden, aux = llama.hidden_states(cfg, params, batch["tokens"], batch.get("positions"),
                                      segment_ids, dropout_rng=dropout_rng)
    targets, weights = losses.next_token_targets(batch["tokens"], segment_ids,
                                                 batch["loss_mask"])
    w, vocab_major = llama.output_projection(cfg, params)
    loss_sum, count = losses.masked_cross_entropy(
        hidden, w, targets, weights, chunk_size=cfg.loss_chunk or losses.DEFAULT_CHUNK_SIZE,
        vocab_major=vocab_major)
  total = loss_sum
  if cfg.is_moe:
    total = total + cfg.router_aux_loss_coef * aux["aux_loss"] * count
    if cfg.router_z_loss_coef:
      total = total + cfg.router_z_loss_coef * aux["z_loss"] * count
  return total, (loss_sum, count, aux)


def _head_metrics(objective: str, sums) -> dict:
  """The metrics of a head objective from summed numerators and denominators."""
  return {name: jnp.sum(sums[num]) / jnp.maximum(jnp.sum(sums[den]), 1.0)
          for name, (num, den) in heads.METRICS.get(objective, {}).items()}


def _uses_rng(cfg: ModelConfig) -> bool:
  """Whether the step draws randomness: adapter dropout or NEFTune noise."""
  return (cfg.adapters is not None and cfg.adapters.lora_dropout > 0
          or cfg.neftune_noise_alpha > 0)


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, lr_fn, grad_accum: int,
                    trainable=None, objective: str = "sft"):
  """``train_step(state, batch) -> (state, metrics)``: pure, for ``jax.jit``.

  The batch's rows split into ``grad_accum`` micro-batches (row i goes to
  micro-batch i mod K, so each device keeps its own rows); gradients of the
  summed loss add up and are divided once by the total trained-token count:
  the same update as one batch of all the tokens.

  Only the ``trainable`` parameters (a bool tree, as ``optim.trainable_mask``;
  None: all) are differentiated: frozen ones enter the loss as constants, so
  autodiff computes no weight gradient for them, and ``tx`` sees (and keeps
  state for) the trainable part alone.
  """
  random = _uses_rng(cfg)

  def loss_of(train, frozen, batch, rng, scale):
    params = train if trainable is None else optim.combine(train, frozen)
    value, aux = stage_loss(cfg, params, batch, objective, dropout_rng=rng if random else None)
    return (value if scale is None else value * scale), aux

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def train_step(state: TrainState, batch):
    if trainable is None:
      train, frozen = state.params, None
    else:
      train, frozen = optim.partition(state.params, trainable)
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
        batch)
    rng, step_rng = jax.random.split(state.rng)
    # float16: the loss is scaled up for the backward pass (optim.dynamic_loss_scale).
    scale = optim.loss_scale(state.opt_state)

    def accumulate(carry, mb_i):
      mb, i = mb_i
      grads, loss_sum, count, aux_loss = carry
      (_, (ls, cnt, aux)), g = grad_fn(train, frozen, mb, jax.random.fold_in(step_rng, i), scale)
      grads = jax.tree_util.tree_map(jnp.add, grads, g)
      return (grads, loss_sum + ls, count + cnt, aux_loss + aux.get("aux_loss", 0.0)), aux

    if grad_accum == 1:
      # One micro-batch: no scan. The scan's fp32 gradient accumulator would
      # be zero-filled and added to for nothing (~3% of the CPU step), and its
      # loop keeps XLA from fusing the gradient into the update. Same rng as
      # the scan's micro-batch 0, so both paths give the same step.
      (_, (loss_sum, count, aux)), grads = grad_fn(train, frozen, batch,
                                                   jax.random.fold_in(step_rng, 0), scale)
      grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
      aux_loss = aux.get("aux_loss", 0.0)
      auxes = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], aux)
    else:
      zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), train)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
              jnp.zeros((), jnp.float32))
      (grads, loss_sum, count, aux_loss), auxes = jax.lax.scan(
          accumulate, init, (micro, jnp.arange(grad_accum)))
    denom = jnp.maximum(count, 1.0)
    g_denom = denom if scale is None else denom * scale
    grads = jax.tree_util.tree_map(lambda g, p: (g / g_denom).astype(p.dtype), grads, train)
    updates, opt_state = tx.update(grads, state.opt_state, train)
    train = optax.apply_updates(train, updates)
    params = train if trainable is None else optim.combine(train, frozen)
    out = {
        "loss": loss_sum / denom,
        "trained_tokens": count,
        "grad_norm": optim.global_norm(grads),
        "lr": lr_fn(state.step),
    }
    if scale is not None:  # the scale this step used; skipped: steps so far
      out["loss_scale"], out["skipped_steps"] = scale, opt_state.skipped
    if cfg.is_moe:
      out["aux_loss"] = aux_loss / grad_accum
      out["expert_fractions"] = jnp.mean(auxes["expert_fractions"], axis=0)
      out["z_loss"] = jnp.mean(auxes["z_loss"])
      per_layer = jnp.mean(auxes["layer_expert_fractions"], axis=0)  # [L, E]
      out["expert_fraction_min"], out["expert_fraction_max"] = per_layer.min(), per_layer.max()
      out["moe_bucket_overflow"] = jnp.mean(auxes["moe_bucket_overflow"])
    out.update(_head_metrics(objective, auxes))
    return TrainState(state.step + 1, params, opt_state, rng), out

  return train_step


def make_eval_step(cfg: ModelConfig, objective: str = "sft"):
  """``eval_step(params, batch) -> (loss_sum, count, metric sums)`` (sums: heads only)."""
  names = {k for pair in heads.METRICS.get(objective, {}).values() for k in pair}

  def eval_step(params, batch):
    _, (loss_sum, count, aux) = stage_loss(cfg, params, batch, objective)
    return loss_sum, count, {k: aux[k] for k in names}
  return eval_step


# ----------------------------------------------------------------------------- sharding

def _state_shardings(abstract_state: TrainState, param_shardings, mesh):
  """Shardings for the whole state: optimizer moments follow their parameter
  (matched by the parameter's path being a suffix of the moment's path)."""
  by_path = {sharding_lib.path_names(p): s for p, s in
             jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  replicated = NamedSharding(mesh, P())

  def pick(path, x):
    names = sharding_lib.path_names(path)
    for i in range(len(names)):
      s = by_path.get(names[i:])
      if s is not None and len(s.spec) <= x.ndim:
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_state)


def _budget(target: str | None = None, mesh=None) -> tuple[int | None, str, str]:
  """(bytes JAX may use on one device or None, the device's name, how many
  devices there are, in words) for the fit checks: this process's first
  device, or with ``target`` (``plan``'s, jaxsft.aot) one GPU of that kind on
  ``mesh``."""
  if target:
    return (aot.device_limit(target), aot.label(target),
            f"--target {target} gives {mesh.devices.size}")
  device = jax.local_devices()[0]  # this process's: another's may not answer
  return (sharding_lib.device_bytes(device), device.device_kind,
          f"jax sees {jax.device_count()}")


def _check_state_fits(name: str, stage, ph, mesh, budget=None) -> None:
  """A clear error, before the optimizer state is allocated, when the state
  alone (parameters, frozen weights, AdamW moments: one shard per device)
  exceeds a device's memory (devices that report a limit: GPU/TPU). The
  weights are on the devices by then, so this catches the usual mistake: full
  fine-tuning's 16 bytes a parameter (8B: 120 GiB) on a device that holds the
  weights. Activations need room on top: passing this is no promise of fit.
  ``budget``: ``_budget``'s answer (default: this process's device)."""
  limit, kind, devices = budget or _budget()
  if limit is None:
    return
  need = ph.state_bytes
  if need <= limit:
    return
  gib = 2 ** 30
  shape = sharding_lib.split_axes(mesh) or {"fsdp": 1}
  hints = []
  if stage.method in ("full", "full_then_lora", "freeze"):
    hints.append("train fewer parameters (method 'lora')")
  if stage.method != "full" and ph.frozen_dtype is None:
    hints.append("hold the frozen weights in the compute dtype (peft.frozen_dtype='compute')")
  hints.append(f"split the state over more devices (config.mesh.fsdp; {devices})")
  raise ValueError(
      f"config.stages.{name}: the training state (parameters, frozen weights and optimizer "
      f"moments) takes {need / gib:.3g} GiB per device on the mesh {shape}, more than the "
      f"{limit / gib:.3g} GiB a {kind} has for JAX, before any "
      f"activation; " + ", or ".join(hints))


def _check_step_fits(name: str, stage, ph, mesh, budget=None) -> None:
  """A clear error, before the first step runs, when the compiled train step
  needs more than a device has: XLA's buffer assignment of the step (state,
  batch, activations kept for the backward pass, the loss's logits, gradients
  and the update's temporaries; ``sharding.compiled_memory``) against the
  device's limit. The runtime allocates those temporaries in one block on top
  of the state, so a step over the limit cannot run: refusing it loses
  nothing, and says what to change instead of XLA's RESOURCE_EXHAUSTED.
  ``budget``: ``_budget``'s answer (default: this process's device)."""
  limit, kind, devices = budget or _budget()
  need = ph.step_bytes
  if limit is None or need is None or need <= limit:
    return
  gib, cfg = 2 ** 30, ph.cfg
  shape = sharding_lib.split_axes(mesh) or {"fsdp": 1}
  rows = config_lib.batch_size(stage) // (sharding_lib.data_parallel_size(mesh)
                                          * stage.grad_accum)
  hints = []
  if cfg.layer_unroll > 1:
    auto = " (auto: remat 'none' unrolls every layer)" if not cfg.scan_unroll else ""
    hints.append(f"run the layers in a rolled loop, which keeps fewer activations at once "
                 f"(config.model.scan_unroll=1; it runs {cfg.layer_unroll} layers per loop "
                 f"step{auto})")
  if cfg.remat != "full":
    remedy = "config.model.remat='full'"
    if cfg.remat in ("none", "save_attention_out", "dots"):  # policies keeping more than it
      remedy = (f"config.model.remat='projections_attention' recomputes the elementwise work, "
                f"{remedy} all of it")
    hints.append(f"recompute activations in the backward pass ({remedy}; it is {cfg.remat!r})")
  if rows > 1:
    hints.append(f"split the batch into smaller micro-batches (config.stages.{name}.grad_accum="
                 f"{2 * stage.grad_accum}: the same batch, {rows} -> {rows // 2 or 1} rows per "
                 f"device at a time)")
  hints.append(f"shorter rows (config.stages.{name}.seq_len={stage.seq_len})")
  if stage.method in ("full", "full_then_lora", "freeze"):
    hints.append("train fewer parameters (method 'lora')")
  hints.append(f"split the work over more devices (config.mesh; {devices})")
  raise ValueError(
      f"config.stages.{name}: one training step needs {need / gib:.3g} GiB per device on the "
      f"mesh {shape} (the state {ph.state_bytes / gib:.3g} GiB, activations and other "
      f"temporaries {(need - ph.state_bytes) / gib:.3g} GiB, by XLA's compiled step), more than "
      f"the {limit / gib:.3g} GiB a {kind} has for JAX; " + ", or ".join(hints))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(sharding_lib.BATCH_AXES, None))


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding,
              keys: tuple[str, ...] = BATCH_KEYS) -> dict[str, jax.Array]:
  """Global host batch → sharded arrays; each process fills only its own devices'
  rows, so this works unchanged when several processes feed one mesh."""
  return {k: jax.make_array_from_callback(batch[k].shape, sharding,
                                          lambda idx, a=batch[k]: a[idx])
          for k in keys}


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Run:
  """What stays the same across stages."""
  config: Any
  out: pathlib.Path
  mesh: jax.sharding.Mesh
  tokenizer: Any
  tokenizer_dir: pathlib.Path
  writer: metrics.MetricsWriter


def _policy(config) -> dict:
  m = config.model
  policy = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                scan_unroll=int(m.scan_unroll), attention=m.attention,
                fused_projections=m.fused_projections,
                moe_dispatch=m.moe_dispatch, moe_capacity_factor=float(m.moe_capacity_factor),
                loss_chunk=int(m.loss_chunk))
  # Router loss coefficients: the model's own (config.json) unless the run sets them.
  policy.update({k: float(m[k]) for k in ("router_aux_loss_coef", "router_z_loss_coef")
                 if m[k] is not None})
  return policy


def _checkpoint_config(path: pathlib.Path, config) -> ModelConfig:
  return _extended_context(ModelConfig.from_json(
      (path / checkpoint_lib.CONFIG_FILE).read_text()).replace(**_policy(config)), config)


def _extended_context(cfg: ModelConfig, config) -> ModelConfig:
  """``cfg`` with the run's ``model.rope_scaling`` for its longest stage
  (``hf.extend_context``)."""
  spec = config.model.rope_scaling
  if spec is None:
    return cfg
  spec = spec.to_dict() if hasattr(spec, "to_dict") else spec
  longest = max(s.seq_len for s in config.stages.values())
  out = hf.extend_context(cfg, spec, longest)
  if out is cfg:
    log.warning("config.model.rope_scaling=%r: the longest stage (seq_len %d) fits the model's "
                "context of %d tokens; RoPE stays unscaled", spec, longest,
                cfg.max_position_embeddings)
  else:
    log.info("RoPE scaling %s: the model's context grows from %d to %d tokens",
             out.rope_dict(), cfg.max_position_embeddings, out.max_position_embeddings)
  return out


def _checkpoint_model(path: pathlib.Path, config, mesh, stage) -> tuple[ModelConfig, Any]:
  """A jaxsft checkpoint's weights, cast by orbax as they are read: to the
  run's parameter dtype, those ``stage`` (the one starting from them; None:
  every stage is done) freezes to its frozen dtype (``optim.load_dtypes``),
  unless the checkpoint has adapters: the stage may merge them, which must
  happen on the full-precision weights."""
  cfg = _checkpoint_config(path, config)
  abstract = llama.abstract_params(cfg)  # in the run's parameter dtype
  host = None
  if cfg.adapters is None and stage is not None:
    dtypes = optim.load_dtypes(abstract, stage, cfg.dtype, cfg.param_dtype)
    host = _host_leaves(abstract, stage)
  else:
    dtypes = jax.tree_util.tree_map(lambda x: x.dtype, abstract)
  _, params = checkpoint_lib.load_model(path, mesh, dtypes=dtypes, host=host)
  return cfg, params


def initial_config(config) -> ModelConfig:
  """The starting model's config (no weights read) with the run's dtype/remat policy."""
  m = config.model
  if m.init is not None:
    try:
      return _extended_context(ModelConfig(**{**dict(m.init), **_policy(config)}), config)
    except TypeError as e:
      raise ValueError(f"config.model.init: {e}") from None
  source = pathlib.Path(m.source)
  if checkpoint_lib.is_checkpoint(source):
    return _checkpoint_config(source, config)
  return _extended_context(hf.config_from_hf(source, **_policy(config)), config)


def initial_model(config, mesh) -> tuple[ModelConfig, Any]:
  """The starting weights: a Hugging Face directory, a jaxsft checkpoint, or
  new. The weights the first stage freezes arrive in its frozen dtype
  (``optim.load_dtypes``), so a LoRA run never holds the whole model in fp32
  on the device."""
  first = config.stages[next(iter(config.stages.keys()))]
  if config.model.init is None and checkpoint_lib.is_checkpoint(pathlib.Path(config.model.source)):
    return _checkpoint_model(pathlib.Path(config.model.source), config, mesh, first)
  cfg = initial_config(config)
  abstract = llama.abstract_params(cfg)
  dtypes = optim.load_dtypes(abstract, first, cfg.dtype, cfg.param_dtype)
  if config.model.init is not None:
    shardings = sharding_lib.param_shardings(abstract, mesh)
    return cfg, llama.init_placed(cfg, jax.random.key(config.seed), shardings, dtypes)
  return hf.load_params(config.model.source, cfg=cfg, mesh=mesh, dtypes=dtypes,
                        host=_host_leaves(abstract, first))


def _has_step_checkpoint(stage_dir: pathlib.Path) -> bool:
  """Whether the stage has a finished step checkpoint (orbax names them by step;
  unfinished ones carry a temporary suffix)."""
  d = stage_dir / "checkpoints"
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


# Keys a re-run may change without changing what its checkpoints mean: where
# the run lives, the devices it runs on, what is exported, how often it logs,
# evaluates and checkpoints, and where and how fast the data are tokenized.
_RERUN_FREE = ("output_dir", "mesh.*", "export.*", "stages.*.log_every",
               "stages.*.checkpoint_every", "stages.*.keep_checkpoints", "stages.*.eval_every",
               "stages.*.eval_batches", "stages.*.generate_eval.*", "stages.*.data.num_proc",
               "stages.*.data.cache_dir")


def _check_run_dir(out: pathlib.Path, config) -> None:
  """Refuse an output dir that holds a different run with something trained:
  one whose config differs from this one in a key that shapes the training
  (model, tokenizer, seed, the stages and any of their data, optimizer or
  PEFT settings: all but ``_RERUN_FREE``). Resuming it would continue on other
  data or another schedule, and a finished stage would not be retrained
  while config.json said it had been. A run refused before its first
  checkpoint (a bad seq_len, say) can be fixed and started again in place."""
  previous = out / "config.json"
  stages = out / "stages"
  trained = stages.is_dir() and any(
      _has_step_checkpoint(d) or (d / "final").is_dir() for d in stages.iterdir())
  if not previous.is_file() or not trained:
    return
  # (config.json has its keys sorted: the stages' order is not in it.)
  old = _flat(json.loads(previous.read_text()))
  new = _flat(json.loads(config.to_json_best_effort()))
  differing = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
               and not any(fnmatch.fnmatchcase(k, free) for free in _RERUN_FREE)]
  if differing:
    key = differing[0]
    raise ValueError(
        f"{out} holds another run whose config.{key} was {old.get(key)!r}; this config says "
        f"{new.get(key)!r}, so its checkpoints cannot be resumed"
        f"{f' ({len(differing) - 1} more keys differ)' if len(differing) > 1 else ''}: choose "
        f"another --config.output_dir, or delete {out} (if only a file's location changed, "
        f"edit {previous} to match)")


def _flat(tree: dict, prefix: str = "") -> dict:
  """A JSON config as {dotted key: value} (lists kept whole)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def train(config) -> pathlib.Path:
  """Run every stage of ``config`` (resuming where a previous run stopped)."""
  config_lib.validate(config)
  out = pathlib.Path(config.output_dir)
  _check_run_dir(out, config)
  primary = jax.process_index() == 0
  if primary:
    try:
      out.mkdir(parents=True, exist_ok=True)
      (out / "config.json").write_text(
          config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    except OSError as e:
      raise ValueError(f"config.output_dir={out}: cannot write the run there ({e.strerror}: "
                       f"{e.filename}); choose a writable directory") from None

  run = _new_run(config, out, write=primary)
  mesh, tokenizer_dir = run.mesh, run.tokenizer_dir

  names = list(config.stages.keys())
  finals = [out / "stages" / n / "final" for n in names]
  # Stages up to the last one with a final checkpoint are done; the next starts from it.
  done = max((i for i, f in enumerate(finals) if checkpoint_lib.is_checkpoint(f)), default=-1)
  resuming = done + 1 < len(names) and _has_step_checkpoint(out / "stages" / names[done + 1])
  if done >= 0:
    log.info("stages %s already complete; continuing from %s", names[:done + 1], finals[done])
  # A QLoRA stage's state holds its frozen weights in 4 bits only; its final
  # model needs the originals, so they are read even when it resumes.
  if resuming and peft_methods.quantization(config.stages[names[done + 1]]) is None:
    # The stage's own checkpoint holds the weights: read none from the source
    # (a 72B model need not be loaded only to be replaced), only their shapes.
    cfg = _checkpoint_config(finals[done], config) if done >= 0 else initial_config(config)
    params = llama.abstract_params(cfg)
  elif done >= 0:
    following = config.stages[names[done + 1]] if done + 1 < len(names) else None
    cfg, params = _checkpoint_model(finals[done], config, mesh, following)
  else:
    cfg, params = initial_model(config, mesh)
  for i, name in enumerate(names):
    if i <= done:
      continue
    # A PEFT adapter of the first stage applies to the source model itself.
    base = None
    if i == 0 and config.model.source is not None and not checkpoint_lib.is_checkpoint(
        pathlib.Path(config.model.source)):
      base = str(pathlib.Path(config.model.source).resolve())
    cfg, params = run_stage(run, name, config.stages[name], cfg, params, base_model=base)
    run.writer.plot()

  if config.export.hf:
    cfg, params = peft_methods.merge(cfg, _on_host_if_parked(params), donate=True)
    if jax.process_count() > 1:
      # Every process takes part in gathering the weights; one writes them.
      params = multihost_utils.process_allgather(params, tiled=True)
    if primary:
      hf.save_params(params, cfg, out / "hf", tokenizer_src=tokenizer_dir,
                     dtype=config.export.dtype, overwrite=True)
  run.writer.close()
  return out


def _new_run(config, out: pathlib.Path, write: bool, devices=None) -> Run:
  """The mesh (over ``devices``, default all), tokenizer and metrics writer
  (``write``: this process writes)."""
  mesh = sharding_lib.make_mesh({k: v for k, v in config.mesh.items()}, devices)
  tokenizer_dir = pathlib.Path(config.tokenizer or config.model.source)
  if checkpoint_lib.is_checkpoint(tokenizer_dir):
    tokenizer_dir = tokenizer_dir / checkpoint_lib.TOKENIZER_DIR
  tokenizer = hf.load_tokenizer(tokenizer_dir, config.model.trust_remote_code)
  return Run(config, out, mesh, tokenizer, tokenizer_dir, metrics.MetricsWriter(out, enabled=write))


def plan(config, target: str | None = None) -> list[dict]:
  """Every stage's train step compiled as ``train`` would run it, from the
  weights' shapes alone: no weight is read or allocated (the data is
  tokenized, as a run does first) and nothing is written. One row per
  compiled step (``full_then_lora``: one per phase) with the bytes one device
  holds of the training state and of the whole step (XLA's figure:
  activations, logits, gradients on top of the state), the device's limit,
  and whether it fits (None where the device reports no limit: CPU).
  ``problem`` holds the message a run would stop with; for a step that does
  not fit without full rematerialization, ``step_bytes_remat_full`` is what it
  needs with it (compiled too). The answer to "does
  this config fit these devices?" before a 72B model is loaded. Every stage is
  planned from the start, whatever the output directory holds.

  ``target`` (``"h100:8"``, jaxsft.aot) plans for GPUs that are not here: the
  mesh is made of that many compile-only devices of that GPU, the steps are
  built and compiled for it, and the limit is what JAX may use on one."""
  config_lib.validate(config)
  devices = aot.devices(target) if target else None
  run = _new_run(config, pathlib.Path(config.output_dir), write=False, devices=devices)
  budget = _budget(target, run.mesh)
  # The mesh's abstract form makes model code pick the target's paths
  # (sharding.compute_platform) while eager work stays on this host.
  with (jax.sharding.use_abstract_mesh(run.mesh.abstract_mesh) if target
        else contextlib.nullcontext()):
    return _plan_rows(config, run, budget)


def _plan_rows(config, run, budget) -> list[dict]:
  """``plan``'s rows, against ``budget`` (``_budget``)."""
  limit, kind, _ = budget
  cfg = initial_config(config)
  params = llama.abstract_params(cfg)
  rows = []
  for name in config.stages.keys():
    stage = config.stages[name]
    pipe = _stage_pipeline(run, name, stage, cfg)
    cfg, params = _with_head(name, stage.objective, cfg, params, pipe, run.mesh, config.seed)
    steps = _total_steps(stage, pipe, config_lib.batch_size(stage))
    spec = _batch_spec(pipe, stage)
    phases = ((0, 1) if peft_methods.switch_step(stage, steps, f"config.stages.{name}")
              is not None else (1,))
    for phase in phases:
      cfg, params = peft_methods.prepare(cfg, params, stage, _adapter_rng(config, name), phase,
                                         tokenizer=run.tokenizer,
                                         where=f"config.stages.{name}")
      ph = _Phase(cfg, params, stage, steps, run.mesh, config.seed)
      ph.compile(spec)
      problem = None
      for check in (_check_state_fits, _check_step_fits):
        try:
          check(name, stage, ph, run.mesh, budget)
        except ValueError as e:
          problem = str(e)
          break
      remat_full = None
      if problem and ph.state_bytes <= limit and cfg.remat != "full":
        # The remedy that saves the most short of a smaller batch, measured:
        # one more compile (with remat 'full' the auto scan_unroll rolls too).
        alt = _Phase(cfg.replace(remat="full"), params, stage, steps, run.mesh, config.seed)
        alt.compile(spec)
        remat_full = alt.step_bytes
        if remat_full is not None:
          problem += (f" (with config.model.remat='full' the step needs "
                      f"{remat_full / 2**30:.3g} GiB: "
                      f"{'it would fit' if remat_full <= limit else 'still too much'})")
      mask = jax.tree_util.tree_leaves(ph.mask)
      sizes = [x.size for x in jax.tree_util.tree_leaves(params)]
      rows.append({
          "stage": name, "method": ("full" if phase == 0 else stage.method), "steps": steps,
          "params": sum(sizes), "trainable": sum(n for n, m in zip(sizes, mask) if m),
          "state_bytes_per_device": ph.state_bytes, "step_bytes_per_device": ph.step_bytes,
          "device_bytes_limit": limit, "device": kind,
          "mesh": sharding_lib.split_axes(run.mesh) or {"fsdp": 1},
          "compile_s": ph.compile_s, "step_bytes_remat_full": remat_full,
          "fits": None if limit is None else problem is None,
          "problem": problem})
    # The next stage starts from this one's final model (its canonical layout).
    box = []
    params = jax.eval_shape(
        lambda p, c=cfg: box.append(peft_methods.canonical(c, p)) or box[-1][1], params)
    cfg = box[-1][0]
  return rows


def format_plan(rows: list[dict]) -> str:
  """``plan``'s rows as a table (GiB per device), then one JSON line per row."""
  gib = lambda b: "-" if b is None else f"{b / 2**30:.3g}"  # noqa: E731
  header = ("stage", "method", "steps", "params", "trainable", "state GiB", "step GiB",
            "device GiB", "compile s", "fits")
  table = [header] + [
      (r["stage"], r["method"], str(r["steps"]), f"{r['params'] / 1e6:.1f}M",
       f"{r['trainable'] / 1e6:.2f}M", gib(r["state_bytes_per_device"]),
       gib(r["step_bytes_per_device"]), gib(r["device_bytes_limit"]), f"{r['compile_s']:.1f}",
       {True: "yes", False: "NO", None: "?"}[r["fits"]]) for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = []
  if rows:
    lines.append(f"per device, on {rows[0]['device']} x mesh {rows[0]['mesh']} (step: state + "
                 "activations + temporaries, by XLA; ?: the device reports no limit)")
  lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
  lines += [json.dumps(r) for r in rows]
  return "\n".join(lines)


def _on_host_if_parked(params):
  """``params`` on the host's CPU device when the last stage parked its frozen
  weights on the host (``_Phase.final``), so that merging LoRA into them for
  the export does not bring the whole fp32 model back onto the accelerator;
  as they are otherwise (or where JAX has no CPU device)."""
  host = sharding_lib.host_device() if _parked(params) else None
  return params if host is None else jax.device_put(params, host)


def _total_steps(stage, pipe, batch: int) -> int:
  if stage.steps is not None:
    return int(stage.steps)
  epochs = stage.epochs if stage.epochs is not None else 1.0
  return max(1, int(math.ceil(epochs * pipe.steps_per_epoch(batch))))


def _stage_pipeline(run: Run, name: str, stage, cfg: ModelConfig):
  """The stage's data, after checking its batch against the mesh and its rows
  against the model's context."""
  batch = config_lib.batch_size(stage)
  data_shards = sharding_lib.data_parallel_size(run.mesh)
  if batch % (data_shards * stage.grad_accum):
    raise ValueError(
        f"config.stages.{name}: a batch of {batch} sequences cannot be split over "
        f"{data_shards} data-parallel devices x grad_accum={stage.grad_accum}; use a batch "
        f"divisible by {data_shards * stage.grad_accum}")
  if stage.seq_len > cfg.max_position_embeddings:
    raise ValueError(f"config.stages.{name}.seq_len={stage.seq_len} exceeds the model's "
                     f"context of {cfg.max_position_embeddings} tokens (max_position_embeddings); "
                     "to train past it, set config.model.rope_scaling='linear' (or 'yarn', "
                     "'llama3'): RoPE is scaled by ceil(seq_len / context)")
  pipe = data_pipeline.build(stage.data, run.tokenizer, seq_len=stage.seq_len,
                             seed=run.config.seed, objective=stage.objective,
                             label_names=cfg.label_names or None,
                             virtual_tokens=peft_methods.virtual_tokens(stage))
  _check_token_ids(name, pipe, cfg, run.tokenizer, run.tokenizer_dir)
  for line in _dropped(pipe, stage):
    log.warning("stage %s: %s", name, line)
  return pipe


def _check_token_ids(name: str, pipe, cfg: ModelConfig, tokenizer, tokenizer_dir) -> None:
  """Refuse a tokenizer (or pad id) with ids the model has no embedding row
  for: XLA clamps an out-of-range gather, so those tokens would train
  silently as others. (The tokenizer's size, not the data's largest id: that
  would read a pre-training corpus whole at every stage's start.)"""
  if len(tokenizer) > cfg.vocab_size:
    raise ValueError(
        f"config.stages.{name}: the tokenizer ({tokenizer_dir}) has {len(tokenizer)} tokens, but "
        f"the model has {cfg.vocab_size} embedding rows (vocab_size): use the model's own "
        "tokenizer, or a model whose vocab_size covers the tokenizer's")
  if not 0 <= pipe.pad_id < cfg.vocab_size:
    raise ValueError(f"config.stages.{name}.data: the pad id {pipe.pad_id} is outside the "
                     f"model's vocabulary [0, {cfg.vocab_size}); set data.pad_id to a token id "
                     "of the model")


def _dropped(pipe, stage) -> list[str]:
  """One line per dataset that lost examples while being tokenized (too long
  for the stage's rows, or without an answer to train on), saying what to do."""
  lines = []
  limit = data_pipeline.length_limit(stage.data, stage.seq_len,
                                     peft_methods.virtual_tokens(stage))
  for part in pipe.datasets:
    c = part.counts
    if c.dropped_too_long:
      lines.append(
          f"dataset {part.name!r}: {c.dropped_too_long} of {c.examples} examples dropped, longer "
          f"than {limit}; raise seq_len (or data.max_length), or set "
          "data.truncation='keep_answer' to keep their answers")
    if c.dropped_no_assistant:
      lines.append(f"dataset {part.name!r}: {c.dropped_no_assistant} of {c.examples} examples "
                   "dropped, with no assistant answer to train on")
  return lines


def _adapter_rng(config, name: str):
  """Adapter initialization is seeded by the run and the stage, so a resumed
  run (or a rerun) builds the very same LoRA factors at the switch."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), _stable_hash(name))


def _batch_spec(pipe, stage) -> dict:
  """(shape, dtype) of the arrays the stage's step takes from each batch."""
  keys = batch_keys(stage.objective)
  return {k: v for k, v in pipe.batch_spec(config_lib.batch_size(stage)).items() if k in keys}


def run_stage(run: Run, name: str, stage, cfg: ModelConfig, params, base_model: str | None = None):
  """Train one stage from ``params``; returns the final (config, parameters):
  a cls / reward stage gives a causal LM its task head (``_with_head``).
  ``params`` may be abstract (ShapeDtypeStructs) when the stage has a
  checkpoint to resume. ``base_model``: the Hugging Face directory the stage's
  frozen base weights are identical to, if any (recorded for PEFT export)."""
  config, mesh = run.config, run.mesh
  incoming_adapters = cfg.adapters
  batch = config_lib.batch_size(stage)
  pipe = _stage_pipeline(run, name, stage, cfg)
  selection_lib.check_datasets(stage.best_metric, pipe.eval_names(), f"config.stages.{name}")
  params = _placed(cfg, params, stage, mesh)
  cfg, params = _with_head(name, stage.objective, cfg, params, pipe, mesh, config.seed)
  keys = batch_keys(stage.objective)
  steps = _total_steps(stage, pipe, batch)
  switch = peft_methods.switch_step(stage, steps, f"config.stages.{name}")
  adapter_rng = _adapter_rng(config, name)

  stage_dir = run.out / "stages" / name
  manager = ocp.CheckpointManager(
      (stage_dir / "checkpoints").resolve(),
      options=ocp.CheckpointManagerOptions(max_to_keep=stage.keep_checkpoints,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True),
      item_names=("state", "data"))
  try:  # the set-up; once the loop runs, its finally closes the manager
    latest = manager.latest_step()
    run.writer.drop_after(name, -1 if latest is None else latest)
    # full_then_lora checkpoints up to the switch hold the full phase's state.
    phase = 0 if switch is not None and (latest is None or latest <= switch) else 1
    if pipe.unseen_labels and latest is None:  # once per stage, not again when resuming
      # Split "data", not "eval": eval rows carry losses and accuracies.
      run.writer.write({"stage": name, "step": 0, "split": "data",
                        "unseen_labels": dict(sorted(pipe.unseen_labels.items()))})
    dropped = {p.name: {k: v for k, v in p.counts.as_dict().items() if k != "kept"}
               for p in pipe.datasets if p.counts.kept < p.counts.examples}
    if dropped and latest is None:
      run.writer.write({"stage": name, "step": 0, "split": "data", "dropped": dropped})
    originals: dict = {}  # QLoRA: the frozen weights it holds in 4 bits, as they came
    place_base = None
    if peft_methods.quantization(stage) is not None and latest is None:
      place_base = lambda p: quantized_base(p, stage, cfg, mesh, originals)  # noqa: E731
    elif peft_methods.quantization(stage) is not None:
      # Resuming: the checkpoint holds the 4-bit state; of the model read (see
      # train) only the originals are kept, the rest goes as in any resume.
      originals.update(_originals(params, stage))
      params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    cfg, params = peft_methods.prepare(cfg, params, stage, adapter_rng, phase,
                                       tokenizer=run.tokenizer, where=f"config.stages.{name}",
                                       place_base=place_base)
    spec = _batch_spec(pipe, stage)
    ph = _checked_phase(name, cfg, params, stage, steps, mesh, config.seed, spec)
    ph.originals = originals

    data_state = None
    if latest is not None:
      restored = _restore_latest(name, manager, latest, ocp.args.Composite(
          state=ocp.args.StandardRestore(jax.tree_util.tree_map(
              lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
              ph.abstract_state, ph.state_shardings)),
          data=ocp.args.JsonRestore()))
      state, data_state = restored.state, restored.data
      log.info("stage %s: resumed from step %d", name, latest)
    else:
      if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(params)):
        raise ValueError(f"stage {name!r}: {stage_dir / 'checkpoints'} holds a step directory "
                         "that orbax does not recognize as a finished checkpoint; move it away "
                         "to restart the stage")
      _save_lora_init(name, stage, cfg, incoming_adapters, params, stage_dir)
      state = ph.init(params)
    del params

    bsh = batch_sharding(mesh)
    generation_eval = _generation_eval(run, name, stage, ph.cfg, stage_dir)
    batches = pipe.batches(batch, state=data_state)
    start = int(state.step)
    if phase == 0 and start == switch:  # resumed from the checkpoint taken at the switch
      ph, state = _switch_to_lora(name, ph, state, stage, steps, mesh, config.seed, adapter_rng,
                                  spec)
      phase = 1
    run.writer.write(ph.compile_row(name, start))
    selection = _selection(stage, stage_dir, start)
    # A stage whose base stays frozen throughout keeps only what it trains as
    # its best (an 8B LoRA stage: megabytes, not its 16-32 GB base each time).
    trained_only = (switch is None and not all(jax.tree_util.tree_leaves(ph.mask))
                    and jax.process_count() == 1)
    flops_per_step = metrics.train_flops(cfg, batch, stage.seq_len)
    peak = metrics.peak_tflops(jax.devices()[0], cfg.dtype)
    progress = metrics.Progress(name, steps, start)
    buckets = []  # MoE: (moe_bucket_overflow, expert_fraction_max) of each logged step
    timer_start, timer_step, seen_tokens = time.perf_counter(), start, 0
    last_saved = latest
  except BaseException:
    manager.close()  # else its threads outlive a refused stage and fail at exit
    raise
  try:
    for step in range(start, steps):
      host_batch = next(batches)
      seen_tokens += int((host_batch["segment_ids"] != 0).sum())
      state, step_metrics = ph.step_fn(state, put_batch(host_batch, bsh, keys))
      done = step + 1
      switching = phase == 0 and done == switch
      save_now = done % stage.checkpoint_every == 0 or done == steps or switching
      if done % stage.log_every == 0 or save_now or done == start + 1:
        m = jax.device_get(step_metrics)
        if not np.isfinite(m["loss"]):
          raise TrainingDiverged(
              f"stage {name!r}, step {done}: the loss is {m['loss']}; stopping. The last good "
              f"checkpoint ({'step ' + str(last_saved) if last_saved else 'none'}) is kept "
              f"in {stage_dir / 'checkpoints'}; lower stages.{name}.lr or check the data")
        elapsed = time.perf_counter() - timer_start
        n_steps = done - timer_step
        row = {"stage": name, "step": done, "split": "train",
               "loss": float(m["loss"]), "lr": float(m["lr"]),
               "grad_norm": float(m["grad_norm"]), "trained_tokens": int(m["trained_tokens"]),
               "tokens_per_s": batch * stage.seq_len * n_steps / elapsed,
               "nonpad_tokens_per_s": seen_tokens / elapsed,
               "step_s": elapsed / n_steps,
               "mfu": (None if peak is None else
                       flops_per_step * n_steps / elapsed / (peak * 1e12))}
        row.update({k: float(m[k]) for k in heads.METRICS.get(stage.objective, {})})
        if "loss_scale" in m:  # float16
          row["loss_scale"], row["skipped_steps"] = float(m["loss_scale"]), int(m["skipped_steps"])
        peaks = [sharding_lib.device_peak_bytes(d) for d in jax.local_devices()]
        if None not in peaks:  # GPU/TPU: beside the compile row's step_bytes_per_device
          row["peak_bytes_per_device"] = max(peaks)
        if cfg.is_moe:
          row["aux_loss"] = float(m["aux_loss"])
          row["expert_fractions"] = [round(float(f), 4) for f in m["expert_fractions"]]
          row.update({k: float(m[k]) for k in ("z_loss", "expert_fraction_min",
                                               "expert_fraction_max", "moe_bucket_overflow")})
          buckets.append((row["moe_bucket_overflow"], row["expert_fraction_max"]))
        run.writer.write(row)
        progress.update(done, row)
        timer_start, timer_step, seen_tokens = time.perf_counter(), done, 0
      paused = False
      evaluations = []
      if stage.eval_every and (done % stage.eval_every == 0 or done == steps):
        evaluations.append(evaluate(ph.eval_fn, state.params, pipe, batch, bsh, stage, name,
                                    done, keys))
      if generation_eval and (done % generation_eval.every == 0 or done == steps):
        evaluations.append(generation_eval(state.params, done))
      for row in evaluations:
        run.writer.write(row)
        run.writer.plot()
        paused = True
        if selection is not None and selection.observe(row):
          _save_best(run, name, ph, state.params, selection, trained_only)
      if save_now:
        # A failed asynchronous write surfaces at the next save (or the final wait).
        with _reporting_save_failure(name, (last_saved, done), manager, stage_dir):
          manager.save(done, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(batches.state())))
        last_saved, paused = done, True
      if switching:
        with _reporting_save_failure(name, (last_saved,), manager, stage_dir):
          manager.wait_until_finished()
        ph, state = _switch_to_lora(name, ph, state, stage, steps, mesh, config.seed,
                                    adapter_rng, spec)
        run.writer.write(ph.compile_row(name, done))
        phase = 1
        log.info("stage %s: switched to LoRA after step %d", name, done)
      if paused:  # throughput counts training steps only
        timer_start, timer_step, seen_tokens = time.perf_counter(), done, 0
      if selection is not None and selection.stop:
        log.info("stage %s: stopping early at step %d: %d evaluations without a better %s "
                 "than step %d's %.6g", name, done, selection.since, selection.metric,
                 selection.step, selection.value)
        run.writer.write({"stage": name, "step": done, "split": "early_stop",
                          **selection.row()})
        break
  finally:
    progress.close()
    with _reporting_save_failure(name, (last_saved,), manager, stage_dir):
      manager.wait_until_finished()
    manager.close()
  hint = mixtral.bucket_hint(ph.cfg, *zip(*buckets)) if buckets else None
  if hint:
    log.warning("stage %s: %s", name, hint)

  if selection is not None and selection.step not in (None, int(state.step)):
    # The best evaluation's weights, as transformers' load_best_model_at_end.
    trained_dir = selection.best_dir / BEST_TRAINED_DIR
    if trained_only and trained_dir.is_dir():
      params = _with_best_trained(trained_dir, state.params, ph.mask)
      del state
      final_cfg, final_params = peft_methods.canonical(ph.cfg, ph.final(params))
    else:
      del state
      final_cfg, final_params = checkpoint_lib.load_model(selection.best_dir, mesh)
    log.info("stage %s: ends with the weights of step %d (%s %.6g)", name, selection.step,
             selection.metric, selection.value)
  else:
    # The final model is in the canonical layout (freeze tuning's split stack joined).
    final_cfg, final_params = peft_methods.canonical(ph.cfg, ph.final(state.params))
  checkpoint_lib.save_model(stage_dir / "final", final_params, final_cfg,
                            tokenizer_src=run.tokenizer_dir, overwrite=True)
  # What a PEFT export of this stage's adapter applies to: the source model,
  # unless the stage changed the base (then export writes the base it has).
  changed = _base_change(stage, final_cfg)
  if (final_cfg.adapters is not None and (base_model is not None and incoming_adapters is None
                                          or changed) and jax.process_index() == 0):
    record = ({"base_model_name_or_path": None, "base_changed": changed} if changed else
              {"base_model_name_or_path": base_model})
    init_dir = stage_dir / peft_export.LORA_INIT_DIR
    if _converts_to_plain_lora(stage, final_cfg) and init_dir.is_dir():
      # export --pissa-convert: the factors it started from, and the model.
      record.update(lora_init=str(init_dir.resolve()),
                    original_base=base_model if incoming_adapters is None else None)
    (stage_dir / "final" / peft_export.BASE_FILE).write_text(json.dumps(record) + "\n")
  return final_cfg, final_params


def _restore_latest(name: str, manager, latest: int, args):
  """``manager.restore(latest, args)``; a checkpoint that cannot be read
  fails as a ValueError that names it and the one before it, to resume from
  once it is moved away (nothing is deleted here)."""
  try:
    return manager.restore(latest, args=args)
  except Exception as e:  # noqa: BLE001 — orbax and TensorStore raise their own kinds
    if checkpoint_lib.out_of_memory(e):
      raise  # the checkpoint is not at fault
    where = pathlib.Path(manager.directory) / str(latest)
    earlier = [s for s in manager.all_steps() if s < latest]
    then = (f"step {max(earlier)}, the checkpoint before it" if earlier else
            "the stage's start, as no earlier checkpoint is kept")
    raise ValueError(f"stage {name!r}: checkpoint {where} cannot be read "
                     f"({checkpoint_lib.error_gist(e)}): it is damaged or incomplete, or holds "
                     "a state of another shape than this stage's. If damaged, move it out of "
                     f"{where.parent} and re-run to resume from {then}") from None


def _converts_to_plain_lora(stage, cfg: ModelConfig) -> bool:
  """Whether the stage's only change to its base is a PiSSA/OLoRA init, which
  ``export --pissa-convert`` undoes exactly (a plain LoRA over the original)."""
  return (cfg.adapters is not None and cfg.adapters.lora_init in PRINCIPAL_INITS
          and stage.method == "lora" and not stage.peft.train_modules)


def _save_lora_init(name: str, stage, cfg: ModelConfig, incoming_adapters, params,
                    stage_dir: pathlib.Path) -> None:
  """A PiSSA/OLoRA stage's factors as it starts, in ``stages/NAME/lora_init``
  (a PEFT adapter directory, as PEFT's ``path_initial_model_for_weight_conversion``):
  what ``export --pissa-convert`` subtracts to give a plain LoRA over the
  original model. Written before the first step; a resumed stage keeps it."""
  if not _converts_to_plain_lora(stage, cfg) or cfg.adapters == incoming_adapters:
    return
  if jax.process_count() > 1:  # the factors are spread over the processes' devices
    log.warning("stage %s: the PiSSA/OLoRA factors it starts from are saved by single-process "
                "runs only; its adapter exports with its residual base", name)
    return
  with hf.staged_dir(stage_dir / peft_export.LORA_INIT_DIR, overwrite=True) as tmp:
    peft_export.save_adapter(cfg, params, tmp, None)


def _base_change(stage, cfg: ModelConfig) -> str | None:
  """Why the stage's frozen base differs from the model it started from, if it does."""
  if cfg.adapters is None:
    return None
  if stage.method == "full_then_lora":
    return "full_then_lora trained the base weights before adding LoRA"
  if cfg.adapters.lora_init in PRINCIPAL_INITS:
    return f"its LoRA started from {cfg.adapters.lora_init!r}, which left the residual as the base"
  if stage.peft.train_modules:
    return f"peft.train_modules={stage.peft.train_modules!r} trained base weights beside the adapter"
  return None


def _selection(stage, stage_dir: pathlib.Path, start: int):
  """The stage's ``selection.Selection`` (None without ``best_metric``)."""
  if stage.best_metric is None:
    return None
  split = selection_lib.METRICS[selection_lib.split_metric(stage.best_metric)[0]][0]
  every = stage.eval_every if split == "eval" else config_lib.generate_eval(stage).every
  return selection_lib.Selection(stage.best_metric, stage.early_stopping_patience, every,
                                 stage_dir / BEST_DIR, start)


def _save_best(run: Run, name: str, ph: "_Phase", params, selection,
               trained_only: bool = False) -> None:
  """Write the weights of a new best evaluation to ``selection.best_dir``
  (a model checkpoint, as ``final``; ``trained_only``: the trained parameters
  alone, in ``trained/``), then its record."""
  if trained_only:
    train = _trained_leaves(params, ph.mask)
    with hf.staged_dir(selection.best_dir, overwrite=True) as tmp:
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((tmp / BEST_TRAINED_DIR).resolve(), train)
  else:
    cfg, params = peft_methods.canonical(ph.cfg, ph.final(params))
    checkpoint_lib.save_model(selection.best_dir, params, cfg, tokenizer_src=run.tokenizer_dir,
                              overwrite=True)
  if jax.process_index() == 0:
    selection.write()
  run.writer.write({"stage": name, "step": selection.step, "split": "best", **selection.row()})


def _trained_leaves(params, mask):
  """``params`` with every frozen leaf (``mask`` False) replaced by None."""
  return jax.tree_util.tree_map(lambda x, trained: x if trained else None, params, mask)


def _with_best_trained(trained_dir: pathlib.Path, params, mask):
  """``params`` with the trained leaves read back from ``trained_dir``
  (``_save_best``'s), each onto the sharding of the one it replaces."""
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      _trained_leaves(params, mask))
  with ocp.StandardCheckpointer() as checkpointer:
    best = checkpointer.restore(trained_dir.resolve(), target)
  # ``best`` has None where ``params`` has a frozen leaf: that leaf stays.
  return jax.tree_util.tree_map(lambda x, b: x if b is None else b, params, best)


def _stable_hash(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _switch_to_lora(name: str, ph: "_Phase", state: TrainState, stage, steps: int, mesh,
                    seed: int, adapter_rng, spec: dict) -> tuple["_Phase", TrainState]:
  """Full → LoRA on the updated weights: the base weights' Adam moments are
  dropped, the LoRA factors start with fresh ones, and the same schedule (a
  function of the step) continues."""
  cfg, params = peft_methods.prepare(ph.cfg, ph.unstore(state.params), stage, adapter_rng, 1)
  step_now, rng_now = state.step, state.rng
  del state
  ph = _checked_phase(name, cfg, params, stage, steps, mesh, seed, spec)
  return ph, ph.init(params).replace(step=step_now, rng=rng_now)


def _checked_phase(name: str, cfg: ModelConfig, params, stage, steps: int, mesh, seed: int,
                   spec: dict) -> "_Phase":
  """A stage's ``_Phase`` with its step compiled for batches of ``spec``, or a
  ValueError before anything is allocated if its state or its step cannot fit
  a device (the state is checked first: no compile for a refusal there)."""
  ph = _Phase(cfg, params, stage, steps, mesh, seed)
  _check_state_fits(name, stage, ph, mesh)
  ph.compile(spec)
  _check_step_fits(name, stage, ph, mesh)
  return ph


class _Phase:
  """What a stage compiles for one set of trainable parameters: the optimizer,
  the trainable mask, shardings and the jitted steps. ``full_then_lora`` builds
  a second one at the switch."""

  def __init__(self, cfg: ModelConfig, params, stage, steps: int, mesh, seed: int):
    objective = stage.objective
    self.cfg, self.seed, self.mesh, self.stage = cfg, seed, mesh, stage
    self.frozen_dtype = optim.frozen_dtype(stage, cfg.dtype, cfg.param_dtype)
    # QLoRA: the frozen projections live in the state in 4 bits (peft/nf4.py);
    # their originals wait on the host for the stage's final model
    # (``quantized_base`` fills this).
    self.quantized = peft_methods.quantization(stage) is not None
    self.originals: dict[tuple[str, ...], Any] = {}
    self.raw_mask = optim.trainable_mask(params, stage)
    # Everything below is built for the parameters as the state holds them.
    stored = jax.eval_shape(self.store, params)
    self.tx, self.lr_fn = optim.build(stage, steps, stored, cfg.dtype)
    self.mask = optim.trainable_mask(stored, stage)
    param_shardings = sharding_lib.param_shardings(stored, mesh)
    self.abstract_state = jax.eval_shape(
        lambda q: init_state(q, self.tx, seed, self.mask), stored)
    self.state_shardings = _state_shardings(self.abstract_state, param_shardings, mesh)
    self.state_bytes = sharding_lib.bytes_per_device(self.abstract_state, self.state_shardings)
    bsh = batch_sharding(mesh)
    # NEFTune is the train step's alone: evaluation, generation and every
    # saved config see the model without it.
    step_cfg = cfg.replace(neftune_noise_alpha=float(stage.neftune_noise_alpha))
    self._step = jax.jit(
        make_train_step(step_cfg, self.tx, self.lr_fn, stage.grad_accum, self.mask, objective),
        in_shardings=(self.state_shardings, bsh), out_shardings=(self.state_shardings, None),
        donate_argnums=0)
    self.step_fn = self.step_bytes = self.compile_s = None  # set by compile()
    self.eval_fn = sharding_lib.with_mesh(
        mesh, jax.jit(make_eval_step(cfg, objective), in_shardings=(param_shardings, bsh)))

  def compile(self, batch_spec: dict) -> None:
    """Compile the train step ahead of the first one, for batches of
    ``batch_spec`` ({key: (shape, dtype)}, ``Pipeline.batch_spec``): the step
    compiles once, as before, and its memory (``step_bytes``: XLA's figure for
    one device) is known before anything runs. ``step_fn`` calls it."""
    batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in batch_spec.items()}
    start = time.perf_counter()
    with jax.set_mesh(self.mesh):
      compiled = self._step.lower(self.abstract_state, batch).compile()
    self.compile_s = time.perf_counter() - start
    self.step_bytes = sharding_lib.compiled_memory(compiled)
    self.step_fn = sharding_lib.with_mesh(self.mesh, compiled)
    log.info("train step compiled in %.1f s; per device: state %.3g GiB, step %s", self.compile_s,
             self.state_bytes / 2 ** 30,
             "unknown" if self.step_bytes is None else f"{self.step_bytes / 2 ** 30:.3g} GiB")

  def compile_row(self, name: str, step: int) -> dict:
    """The metrics row of the compiled step: compile time, bytes per device."""
    return {"stage": name, "step": step, "split": "compile", "compile_s": self.compile_s,
            "state_bytes_per_device": self.state_bytes,
            "step_bytes_per_device": self.step_bytes}

  def store(self, params):
    """``params`` as the state holds them (``store_params``)."""
    return store_params(params, self.raw_mask, self.stage, self.cfg, self.mesh)

  def _restored(self, params):
    """(``params`` with QLoRA's originals back, its trainable mask)."""
    if not self.quantized:
      return params, self.raw_mask
    params = nf4.restore(params, self.originals)
    return params, optim.trainable_mask(params, self.stage)

  def unstore(self, params):
    """The state's ``params`` back in the model's parameter dtype."""
    params, mask = self._restored(params)
    if self.frozen_dtype is None:
      return params
    return optim.store_frozen(params, mask, jnp.dtype(self.cfg.param_dtype))

  def final(self, params):
    """The state's ``params`` as the stage's result, all in the parameter
    dtype. Frozen weights held narrower (``frozen_dtype``) are cast up on the
    host, leaf by leaf, and stay there as numpy arrays: an 8B LoRA stage that
    trained in 15 GiB of device memory does not need 30 GiB there at its end.
    The final checkpoint is written from the host; the next stage places them
    back (``_placed``). With several processes, each holding only its own
    shards, they are cast on the devices instead."""
    if self.frozen_dtype is None or jax.process_count() > 1:
      return self.unstore(params)
    params, mask = self._restored(params)
    dtype = jnp.dtype(self.cfg.param_dtype)
    return jax.tree_util.tree_map(
        lambda x, trained: x if trained or x.dtype != self.frozen_dtype else
        np.asarray(jax.device_get(x)).astype(dtype), params, mask)

  def init(self, params) -> TrainState:
    return build_state(lambda q: init_state(q, self.tx, self.seed, self.mask),
                       self.store(params), self.state_shardings)


def build_state(init, stored, state_shardings) -> TrainState:
  """``init(stored)`` (stored params -> TrainState) on ``state_shardings``,
  ``stored`` donated. Leaves not yet on the state's shardings (LoRA factors,
  which ``add_params`` places by shapes of its own) are moved there first, so
  that the init reuses every buffer rather than copying those beside them
  (and warning "Some donated buffers were not usable")."""
  stored = jax.device_put(stored, state_shardings.params, donate=True)
  return jax.jit(init, out_shardings=state_shardings, donate_argnums=0)(stored)


def store_params(params, mask, stage, cfg: ModelConfig, mesh=None, keep=None):
  """``params`` as a stage's state holds them: the frozen (``mask`` False)
  weights in the stage's frozen dtype (``optim.store_frozen``), and with
  ``peft.quantization`` its frozen projections in 4 bits (``nf4.store``; those
  already stored stay as they are), each part on the sharding its name gives
  over ``mesh``, ``keep(path, x)`` seeing each original first. Leaf by leaf,
  each original consumed; abstract leaves give the abstract result."""
  # The parts of 4-bit weights (their fp32 scales) keep their dtypes.
  cast = jax.tree_util.tree_map_with_path(
      lambda p, m: m or nf4.is_part(sharding_lib.path_names(p)), mask)
  params = optim.store_frozen(params, cast, optim.frozen_dtype(stage, cfg.dtype,
                                                              cfg.param_dtype))
  if peft_methods.quantization(stage) is None:
    return params
  return nf4.store(params, mask, bool(stage.peft.double_quant), mesh, keep)


def quantized_base(params, stage, cfg: ModelConfig, mesh, originals: dict):
  """QLoRA (``peft.quantization``): the base model ``params`` with the
  projections the stage freezes in 4 bits, before its adapters are added
  (``peft_methods.prepare``'s ``place_base``). Each original goes into
  ``originals`` (by path) for the stage's final model: a host (numpy) leaf as
  it is, quantized onto the devices a layer at a time; a device leaf copied
  to the host first."""
  _host_leaves(params, stage)  # refuses several processes

  def keep(path, x):
    originals[path] = _on_host(x)
  return store_params(params, optim.trainable_mask(params, stage), stage, cfg, mesh, keep)


def _originals(params, stage) -> dict:
  """The weights of ``params`` a QLoRA stage holds in 4 bits, on the host, by path."""
  out = {}
  for (path, x), host in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree_util.tree_leaves(_host_leaves(params, stage))):
    if host:
      out[sharding_lib.path_names(path)] = _on_host(x)
  return out


def _on_host(x) -> np.ndarray:
  """``x`` as a host array: a numpy leaf as it is, a device array copied."""
  return x if isinstance(x, np.ndarray) else np.asarray(jax.device_get(x))


def _host_leaves(params, stage):
  """Where a model that ``stage`` starts from is read into host memory rather
  than onto the devices: the projections a QLoRA stage quantizes
  (``quantized_base`` sends them a layer at a time). None: nowhere."""
  if stage is None or peft_methods.quantization(stage) is None:
    return None
  if jax.process_count() > 1:
    raise ValueError("peft.quantization (QLoRA) keeps the original frozen weights on the "
                     "host of a single process; it does not run on several processes yet")
  return jax.tree_util.tree_map_with_path(
      lambda p, trained: not trained and nf4.quantizable(sharding_lib.path_names(p)) is not None,
      optim.trainable_mask(params, stage))


def _placed(cfg: ModelConfig, params, stage, mesh):
  """``params`` with any host (numpy) leaf, a frozen weight the previous stage
  left on the host (``_Phase.final``), put on its sharding in the dtype this
  stage reads it in (``optim.load_dtypes``: still the compute dtype if this
  stage freezes it too)."""
  if not _parked(params):
    return params
  dtypes = optim.load_dtypes(params, stage, cfg.dtype, cfg.param_dtype)
  host = _host_leaves(params, stage) or jax.tree.map(lambda _: False, params)
  return jax.tree_util.tree_map(
      lambda x, dtype, s, h: (x.astype(dtype) if h else jax.device_put(x.astype(dtype), s))
      if isinstance(x, np.ndarray) else x,
      params, dtypes, sharding_lib.param_shardings(params, mesh), host)


def _parked(params) -> bool:
  """Whether ``params`` holds host (numpy) leaves left by ``_Phase.final``."""
  return any(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params))


def _with_head(name: str, objective: str, cfg: ModelConfig, params, pipe, mesh, seed: int):
  """(config, params) a stage of ``objective`` trains: a cls / reward stage
  replaces a causal LM's lm_head by a new score head over the data's labels
  (stored in the config, so the checkpoint knows its id2label); a language-model
  stage refuses a model that has a head."""
  if objective not in heads.OBJECTIVES:
    if cfg.has_head:
      raise ValueError(f"config.stages.{name}.objective={objective!r} trains a causal LM, but "
                       f"the model has a {cfg.problem_type} head and no lm_head (from an "
                       "earlier stage or model.source); put language-model stages first")
    return cfg, params
  if objective == "cls" and len(pipe.label_names) == 1 and not pipe.multi_label:
    raise ValueError(f"config.stages.{name}: the training data have one label "
                     f"({pipe.label_names[0]!r}); a softmax head over one class learns nothing. "
                     "Add rows of other labels, or give the rows a 'labels' list for a "
                     "multi-label head (one sigmoid per label)")
  head_cfg = heads.head_config(cfg, objective, pipe.label_names, pipe.multi_label, pipe.pad_id)
  if head_cfg.pad_token_id != pipe.pad_id:  # the id transformers will pool by
    pipe.check_head_ends(head_cfg.pad_token_id)
  if pipe.unseen_labels:
    log.warning("stage %s: evaluation labels unseen in training (always wrong): %s", name,
                dict(sorted(pipe.unseen_labels.items())))
  params = heads.attach(cfg, params, head_cfg, jax.random.fold_in(jax.random.key(seed), 6), mesh)
  return head_cfg, params


@contextlib.contextmanager
def _reporting_save_failure(name: str, steps, manager, stage_dir: pathlib.Path):
  """Turn a failed (possibly asynchronous) checkpoint write of one of ``steps``
  into one clear error naming the step that failed and the one that is intact."""
  try:
    yield
  except (OSError, ValueError) as e:
    if isinstance(e, (TrainingDiverged, CheckpointSaveFailed)):
      raise
    saved = set(manager.all_steps())
    failed = min((s for s in steps if s is not None and s not in saved), default=steps[-1])
    intact = sorted(s for s in saved if s != failed)
    kept = f"step {intact[-1]}" if intact else "none yet"
    why = " ".join(str(e).split()) or type(e).__name__
    if len(why) > 400:  # orbax names the file first and the OS reason last
      why = why[:150] + " ... " + why[-220:]
    raise CheckpointSaveFailed(
        f"stage {name!r}: writing the checkpoint of step {failed} to "
        f"{stage_dir / 'checkpoints'} failed ({why}). The previous checkpoint "
        f"({kept}) is intact; free disk space (or lower keep_checkpoints) and re-run the "
        "same command to resume from it") from None


def _generation_eval(run: Run, name: str, stage, cfg: ModelConfig, stage_dir: pathlib.Path):
  """``f(params, step) -> metrics row`` for ``stage.generate_eval`` (None when
  off): greedy answers to its rows, scored as ``evaluate --metric json-labels``.
  Each example's prompt, generation, prediction and reference go to
  ``stage_dir/generations/step_N.jsonl`` (as ``evaluate --predictions``), so
  what the scores count can be read. Every process generates (the weights are
  sharded over all of them); process 0 writes."""
  g = config_lib.generate_eval(stage)
  if not g.every:
    return None
  try:
    examples = evaluate_lib.json_examples(
        evaluate_lib.read_examples(g.path, g.format, g.system_prompt))
  except ValueError as e:
    raise ValueError(f"config.stages.{name}.generate_eval: {e}") from None
  examples = examples[:g.examples] if g.examples is not None else examples
  template = data_templates.get_template(stage.data.template, run.tokenizer)

  def run_eval(params, step: int) -> dict:
    summary, records = evaluate_lib.json_label_eval(
        cfg, params, run.tokenizer, examples, template=template,
        max_new_tokens=g.max_new_tokens, batch_size=g.batch_size)
    path = stage_dir / GENERATIONS_DIR / f"step_{step}.jsonl"
    if jax.process_index() == 0:
      evaluate_lib.write_predictions(path, records)
    return {"stage": name, "step": step, "split": "generate", **summary,
            "predictions": str(path.relative_to(run.out))}

  run_eval.every = g.every
  return run_eval


def evaluate(eval_fn, params, pipe, batch: int, bsh, stage, name: str, step: int,
             keys: tuple[str, ...] = BATCH_KEYS) -> dict:
  """The eval row of ``step``: loss over every eval token (a head's metrics
  over every eval example) and, with several eval datasets, the same for each
  under ``datasets`` (as LLaMA-Factory's eval_on_each_dataset), each packed on
  its own. ``stage.eval_batches`` caps the batches of each dataset."""
  names = pipe.eval_names()
  groups = names if len(names) > 1 else [None]
  sums_by = {}
  for group in groups:
    sums = {"loss": 0.0, "count": 0.0}
    for i, b in enumerate(pipe.eval_batches(batch, dataset=group)):
      if stage.eval_batches is not None and i >= stage.eval_batches:
        break
      s, c, more = jax.device_get(eval_fn(params, put_batch(b, bsh, keys)))
      for k, v in (("loss", s), ("count", c), *more.items()):
        sums[k] = sums.get(k, 0.0) + float(v)
    sums_by[group] = sums
  total = {k: sum(s.get(k, 0.0) for s in sums_by.values())
           for k in {k for s in sums_by.values() for k in s}}
  row = {"stage": name, "step": step, "split": "eval", **_eval_metrics(total, stage.objective)}
  if len(groups) > 1:
    row["datasets"] = {g: _eval_metrics(sums_by[g], stage.objective) for g in groups}
  return row


def _eval_metrics(sums: dict, objective: str) -> dict:
  """loss, trained_tokens and a head's metrics from summed numerators and denominators."""
  count = sums["count"]
  out = {"loss": sums["loss"] / count if count else None, "trained_tokens": int(count)}
  for metric, (num, den) in heads.METRICS.get(objective, {}).items():
    out[metric] = sums[num] / sums[den] if sums.get(den) else None
  return out
