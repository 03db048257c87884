"""Run configuration: defaults, stage builder and validation.

A config file defines ``get_config()`` returning a ConfigDict built from
``base_config()``; every key can be overridden on the command line
(``--config.stages.sft.lr=2e-5``). The keys, with the field's practice:

  output_dir        where metrics.jsonl, loss.png, checkpoints and exports go
  seed              one seed for initialization and the data order
  model.source      Hugging Face directory or jaxsft checkpoint to start from
  model.init        or: ModelConfig fields to build a model from scratch
  model.dtype       compute dtype (bfloat16: bf16 matmuls, fp32 master weights)
  model.param_dtype parameter dtype (bfloat16 here = pure-bf16 training)
  model.remat       rematerialization policy of each layer (models/model_config.py)
  model.scan_unroll layers per iteration of the layer scan (0: auto, every layer
              unrolled with remat 'none' up to 32 layers, else a rolled loop;
              1: a loop over layers, the least memory, compile time flat in
              depth; num_layers: no loop, each layer its own code: ~8-10%
              faster, more memory, compile time grows with depth;
              docs/BENCHMARKS.md)
  model.attention   auto | xla | cudnn
  model.fused_projections   auto | on | off: q/k/v, and gate/up, each as one matmul
              of their concatenated weights (weights stay separate parameters);
              auto: on a GPU unless the mesh splits tensor, never for
              weights with a LoRA/DoRA term (llama.fuses_projections)
  model.trust_remote_code   never true unless you trust the model's own code
  model.moe_dispatch        MoE models: auto | dense | bucketed | dropless | grouped
                            (models/mixtral.py)
  model.moe_capacity_factor bucketed dispatch: rows per expert bucket as a multiple of
              an even share of the routed tokens (default 2.0; a layer whose
              busiest expert overflows runs bigger buckets, nothing is dropped:
              metric moe_bucket_overflow)
  model.loss_chunk  time steps per vocab chunk of the loss (0: 128); the logits of
              batch x loss_chunk positions are held at once, in fp32
  model.router_aux_loss_coef   MoE load-balancing loss weight; default: the model's
              config.json (Mixtral-8x7B: 0.02). Always added in training, unlike
              transformers' output_router_logits=False default; 0 turns it off
  model.router_z_loss_coef     ST-MoE router z-loss weight (default 0: off; ~1e-3)
  model.rope_scaling  train past the model's context (hf.extend_context): "linear",
              "yarn" or "llama3" scale RoPE by ceil(longest seq_len / context), as
              LLaMA-Factory's rope_scaling; or transformers' rope_scaling dict, e.g.
              {"rope_type": "yarn", "factor": 4.0}. The context grows by the factor,
              and the export's config.json carries both
  tokenizer         tokenizer directory (default: model.source)
  mesh              sizes of the data / fsdp / tensor / expert mesh axes (-1: the rest)
  stages            name -> stage (``stage()``), run in the order written
  export.hf         write a Hugging Face directory to OUTPUT/hf after the last stage
  export.dtype      its dtype (default: the model's parameter dtype)

A stage (``stage(**overrides)``):

  objective   lm (continued pre-training) | sft (answer-only loss) |
              cls (classification head on label rows: softmax, or sigmoids when
              rows carry several labels) | reward (scalar head on pairwise rows,
              -log sigmoid(r_chosen - r_rejected)). A cls/reward stage replaces
              the lm_head by a score head (models/heads.py); no LM stage may follow
  method      full | lora | dora | full_then_lora | prompt | p_tuning | prefix | adapter |
              freeze (jaxsft/peft/methods.py); the knobs live in ``peft``:
                lora/dora/full_then_lora: targets ("all-linear", names such as
                  ["q_proj", "v_proj"], or a regex), rank, alpha, rslora, dropout,
                  init (kaiming | gaussian: B starts at zero; pissa | olora: both factors
                  from the weight's SVD / QR, the base becomes the residual, as PEFT's
                  init_lora_weights and LLaMA-Factory's pissa_init), switch_at (the
                  fraction of steps trained in full before LoRA),
                  lora_lr_scale (full_then_lora: the LoRA phase's lr multiplier; LoRA
                  usually wants several times the full fine-tuning lr), loraplus_lr_ratio
                  (LoRA+: the B factors train at this multiple of the lr, e.g. 16)
                prompt: virtual_tokens, prompt_init_text (None: random init)
                p_tuning: virtual_tokens, encoder ("mlp" | "lstm"), encoder_hidden
                  (None: the model width)
                prefix: virtual_tokens, prefix_projection_hidden (0: prefixes learned
                  directly; > 0: PEFT's reparameterization MLP of that width)
                adapter: bottleneck_size
                freeze: train_layers (the last N layers train), train_modules
                any method: train_modules, a regex over parameter paths
                  ("layers/mlp", "embed", "final_norm") that also trains;
                  frozen_dtype: "auto" (default; "compute" on GPU/TPU, "param" on
                  CPU), "compute" (frozen weights held in model.dtype: the step
                  computes the same, an 8B LoRA base takes 15 GiB instead of 30) or
                  "param"
                lora: quantization "nf4" (QLoRA, LLaMA-Factory's quantization_bit=4):
                  the frozen attention and MLP projections are held in 4 bits as
                  bitsandbytes' NF4 (0.52 byte a weight; the model trains against what
                  transformers' load_in_4bit computes), with double_quant (default
                  True) their block scales in 8 bits too. The projections are read to
                  the host and quantized onto the devices a layer at a time; the
                  stage's final model has the original weights, so export merges into
                  those. Refused with dora, pissa/olora and other methods
  lr          peak learning rate. SFT uses about 0.1x the pre-training lr
              (e.g. 1e-5..2e-5 for 7B-70B chat models, 1e-4 for small ones)
  lr_groups   {regex over parameter paths: lr multiplier}, first match wins,
              e.g. {"embed|lm_head": 0.1} to move the embeddings more gently
  schedule    cosine | linear | constant, after warmup; min_lr_ratio sets the floor
  warmup_ratio / warmup_steps   a small warmup (1-5% of steps), longer for larger lr
  epochs / steps  SFT stops by loss convergence: ~2 epochs for >=100k samples,
              more for small sets; steps overrides epochs
  batch_size  sequences per optimizer step (global); or batch_tokens
  grad_accum  micro-batches per step (token-weighted, same update as one big batch)
  seq_len     packed row length
  weight_decay, b1, b2, eps, grad_clip   AdamW and global-norm clipping
  log_every, eval_every, eval_batches, checkpoint_every, keep_checkpoints
              (with several eval datasets each is scored on its own, as LLaMA-Factory's
              eval_on_each_dataset, and eval_batches caps the batches of each)
  best_metric  end the stage with the weights of its best evaluation, as transformers'
              load_best_model_at_end + metric_for_best_model (jaxsft/selection.py):
              loss, accuracy (cls), pairwise_accuracy or margin (reward), from
              eval_every's evaluations; exact_match, micro_f1, macro_f1 or
              parse_failure_rate, from generate_eval's; METRIC/DATASET for one eval
              dataset's (e.g. loss/intent_train). Each new best is written to
              stages/NAME/best (a LoRA-like stage: its trained parameters alone)
              (None = off: the stage ends with its last weights)
  early_stopping_patience  with best_metric: stop after this many evaluations in a
              row without a better value (0 = never), as EarlyStoppingCallback
  freeze_router  MoE: keep the router weights fixed (experts and the rest train)
  loss_scale, loss_scale_interval  model.dtype float16 only: dynamic loss scaling, as
              torch.amp.GradScaler. The summed token loss is multiplied by the scale
              (start: loss_scale, default 1024) before the backward pass and the
              gradients divided by it after; a step whose gradients overflow is
              skipped (weights and AdamW state unchanged) and halves the scale, which
              doubles after loss_scale_interval (2000) finite steps in a row
  neftune_noise_alpha  NEFTune: uniform noise of magnitude alpha/sqrt(seq_len x width)
              on the input embeddings of training steps (0 = off; the paper uses
              5-15), as transformers' and LLaMA-Factory's neftune_noise_alpha
  generate_eval  generative evaluation during an lm/sft stage (``jaxsft.evaluate``,
              metric json-labels): every N steps (and at the end) answer the
              rows of ``path`` greedily and score the JSON in the answers;
              exact_match, micro_f1, macro_f1, parse_failure_rate go into
              metrics.jsonl (split "generate") and the loss plot. Keys: every
              (0 = off), path, format, system_prompt (for rows without one),
              examples (the first N rows; None = all), max_new_tokens, batch_size.
              Prompts are rendered with the stage's data.template
  data        the stage's data mixture (``jaxsft.data.pipeline`` documents it)
"""
from __future__ import annotations

import difflib
import math
import os
import re
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

from jaxsft import hf
from jaxsft import selection
from jaxsft.data import pipeline as data_pipeline
from jaxsft.data import sources as data_sources
from jaxsft.data import templates as data_templates
from jaxsft.models.model_config import (ATTENTION_IMPLS, FUSED_PROJECTIONS, MOE_DISPATCHES,
                                         REMAT_POLICIES)
from jaxsft.peft import methods as peft_methods
from jaxsft.sharding import MESH_AXES

OBJECTIVES = ("lm", "sft", "cls", "reward")
LATER_OBJECTIVES = ()
METHODS = peft_methods.METHODS
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- command line

INIT_PREFIX = "--config.model.init."


def flags_parser(config_flag):
  """An ``absl.app.run`` flags parser for a CLI with a ``--config`` file flag
  (``config_flag``, from ``config_flags.DEFINE_config_file``).

  A ``--config.KEY=VALUE`` override that does not apply (a typo, a key the
  config lacks, a value of the wrong type) prints ``error: …`` with the
  nearest key and exits with status 2, instead of a traceback from inside
  ml_collections. ``--config.model.init.FIELD=VALUE`` sets any ModelConfig
  field of a new model, also one the config file leaves out (ml_collections
  cannot add keys), typed as the field."""
  from absl import flags  # noqa: PLC0415  (CLIs only)

  def parse(argv: list[str]) -> list[str]:
    import sys  # noqa: PLC0415

    init = [a for a in argv if a.startswith(INIT_PREFIX)]
    rest = [a for a in argv if not a.startswith(INIT_PREFIX)]
    # config_flags reads the overrides from sys.argv itself.
    sys.argv = [a for a in sys.argv if not a.startswith(INIT_PREFIX)]
    path = _config_path(rest)
    if path is not None and not os.path.isfile(path):
      _cli_error(f"--config {path}: no such file (a Python file with a get_config(), e.g. "
                 "configs/demo.py)")
    try:
      remaining = flags.FLAGS(rest)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      if isinstance(e, AttributeError) and "get_config" in str(e):
        _cli_error(f"--config {path} defines no get_config(): a config file returns its "
                   "ConfigDict from get_config() (see configs/demo.py)")
      if not _raised_by_overrides(e):
        raise
      _cli_error(f"a --config override does not apply: {_plain(e)} (the keys are in "
                 "jaxsft/config.py; the argument was one of "
                 f"{[a.split('=')[0] for a in rest if a.startswith('--config.')]})")
    except flags.Error as e:
      _cli_error(str(e))
    config = config_flag.value
    if init and config is not None:  # without --config the CLI says that one is needed
      if config.model.init is None:
        _cli_error(f"{init[0].split('=')[0]}: this config starts from model.source, not "
                   "model.init; its architecture comes from the model's config.json")
      try:
        config.model.init = {**dict(config.model.init), **dict(map(init_override, init))}
      except ValueError as e:
        _cli_error(str(e))
    return remaining

  return parse


def init_override(arg: str) -> tuple[str, Any]:
  """``--config.model.init.FIELD=VALUE`` → (FIELD, VALUE typed as the ModelConfig field)."""
  import ast  # noqa: PLC0415
  import dataclasses  # noqa: PLC0415

  from jaxsft.models.model_config import ModelConfig  # noqa: PLC0415

  key, eq, raw = arg[len(INIT_PREFIX):].partition("=")
  fields = {f.name: str(f.type) for f in dataclasses.fields(ModelConfig)}
  if not eq:
    raise ValueError(f"{arg}: give a value, {INIT_PREFIX}{key}=VALUE")
  if key not in fields:
    close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ""
    raise ValueError(f"{arg}: {key!r} is not a model field{hint} (the fields are "
                     "jaxsft.models.ModelConfig's)")
  kind = fields[key]
  if kind.startswith("str"):
    return key, raw
  if kind.startswith("bool"):
    if raw.lower() not in ("true", "false"):
      raise ValueError(f"{arg}: {key} is true or false")
    return key, raw.lower() == "true"
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise ValueError(f"{arg}: {raw!r} is not a value of {key}'s type ({kind})") from None
  if kind.startswith("float") and isinstance(value, (int, float)) and not isinstance(value, bool):
    return key, float(value)
  if kind.startswith("tuple") and isinstance(value, (list, tuple)):
    return key, tuple(value)
  if kind.startswith("int") and (isinstance(value, int) and not isinstance(value, bool)
                                 or value is None and "None" in kind):
    return key, value
  raise ValueError(f"{arg}: {raw!r} is not a value of {key}'s type ({kind})")


def _config_path(argv: list[str]) -> str | None:
  """The file of ``--config FILE`` / ``--config=FILE`` in ``argv`` (without
  ml_collections' ``:ARGS`` suffix), or None."""
  for i, a in enumerate(argv):
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
    if a.startswith("--config="):
      return a[len("--config="):].split(":")[0]
  return None


def _raised_by_overrides(e: BaseException) -> bool:
  """Whether ``e`` came from ml_collections applying a --config.KEY override
  (not from running the config file, whose own traceback says more)."""
  tb, last = e.__traceback__, None
  while tb is not None:
    last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
  return last is not None and "ml_collections" in last and "config_file" not in last


def _plain(e: BaseException) -> str:
  """ml_collections' message on one line, without the quotes a KeyError adds."""
  text = str(e.args[0]) if e.args else str(e)
  text = " ".join(text.replace("\\n", "; ").replace("\\'", "").replace("'", "").split())
  return f"no key {text}" if isinstance(e, (KeyError, AttributeError)) else text


def _cli_error(message: str) -> None:
  import sys  # noqa: PLC0415
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


# ----------------------------------------------------------------------------- defaults

def base_config() -> ml_collections.ConfigDict:
  """Every run-level key with its default (module docstring)."""
  c = ml_collections.ConfigDict()
  c.output_dir = "runs/default"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      source=placeholder(str), init=placeholder(dict), dtype="bfloat16",
      param_dtype="float32", remat="none", scan_unroll=0, attention="auto",
      fused_projections="auto",
      trust_remote_code=False,
      moe_dispatch="auto", moe_capacity_factor=2.0, loss_chunk=0,
      router_aux_loss_coef=placeholder(float), router_z_loss_coef=placeholder(float),
      rope_scaling=ml_collections.FieldReference(None, field_type=object)))
  c.tokenizer = placeholder(str)
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  # Stages run in the order written; a ConfigDict sorts its keys unless told not to.
  c.stages = ml_collections.ConfigDict(sort_keys=False)
  c.export = ml_collections.ConfigDict(dict(hf=False, dtype=placeholder(str)))
  return c


def stage_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      objective="sft", method="full",
      lr=1e-5, lr_groups=placeholder(dict), schedule="cosine", min_lr_ratio=0.0,
      warmup_ratio=0.03, warmup_steps=placeholder(int),
      epochs=placeholder(float), steps=placeholder(int),
      batch_size=8, batch_tokens=placeholder(int), grad_accum=1, seq_len=2048,
      weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
      log_every=10, eval_every=0, eval_batches=placeholder(int),
      best_metric=placeholder(str), early_stopping_patience=0,
      checkpoint_every=500, keep_checkpoints=2, freeze_router=False, neftune_noise_alpha=0.0,
      loss_scale=1024.0, loss_scale_interval=2000,
      generate_eval=ml_collections.ConfigDict(dict(
          every=0, path=placeholder(str), format="auto", system_prompt=placeholder(str),
          examples=placeholder(int), max_new_tokens=64, batch_size=32)),
      data=data_pipeline.default_config(), peft=peft_methods.default_config()))


def stage(**overrides) -> ml_collections.ConfigDict:
  """A stage ConfigDict: the defaults with ``overrides`` applied (``data`` may be a dict)."""
  s = stage_defaults()
  _check_keys(overrides, s, "stage")
  data = overrides.pop("data", None)
  peft = overrides.pop("peft", None)
  s.update(overrides)
  if data is not None:
    _check_keys(data, s.data, "stage.data")
    s.data.update(data)
  if peft is not None:
    _check_keys(peft, s.peft, "stage.peft")
    s.peft.update(peft)
  return s


def _check_keys(given: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> None:
  for key in given:
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
      hint = f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ""
      raise ValueError(f"{where}: unknown key {key!r}{hint} (valid keys: "
                       f"{', '.join(sorted(defaults))})")


def _one_of(value, choices, where, later=()) -> None:
  if value in later:
    raise ValueError(f"{where}={value!r} is not available yet (it comes with its own issue); "
                     f"available now: {', '.join(choices)}")
  if value not in choices:
    raise ValueError(f"{where}={value!r} is not one of {', '.join(map(str, choices))}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Check a run config before anything heavy starts; raise ValueError naming the key."""
  _check_keys(config, base_config(), "config")
  _check_keys(config.model, base_config().model, "config.model")
  _check_keys(config.mesh, base_config().mesh, "config.mesh")
  _check_keys(config.export, base_config().export, "config.export")
  m = config.model
  if (m.source is None) == (m.init is None):
    raise ValueError("config.model: set exactly one of model.source (a Hugging Face directory "
                     "or jaxsft checkpoint) and model.init (fields of a new model)")
  if m.init is not None and config.tokenizer is None:
    raise ValueError("config.tokenizer: a model built from model.init needs a tokenizer "
                     "directory")
  # (Not model.source: it may be the final model of a run still to come, as
  # configs/demo_cls.py starts from the demo's; loading it says it is missing.)
  t = config.tokenizer
  if isinstance(t, str) and data_sources.looks_local(t) and not os.path.isdir(os.path.expanduser(t)):
    raise ValueError(f"config.tokenizer={t}: no such directory (this local path does not exist; "
                     "a hub name has the form org/name)")
  _one_of(m.dtype, DTYPES, "config.model.dtype")
  _one_of(m.param_dtype, DTYPES, "config.model.param_dtype")
  _one_of(m.remat, REMAT_POLICIES, "config.model.remat")
  _one_of(m.attention, ATTENTION_IMPLS, "config.model.attention")
  _one_of(m.fused_projections, FUSED_PROJECTIONS, "config.model.fused_projections")
  _one_of(m.moe_dispatch, MOE_DISPATCHES, "config.model.moe_dispatch")
  if not isinstance(m.moe_capacity_factor, (int, float)) or not m.moe_capacity_factor > 0:
    raise ValueError(f"config.model.moe_capacity_factor={m.moe_capacity_factor!r} must be a "
                     "number > 0 (2.0: each expert's bucket holds twice an even share)")
  if not isinstance(m.scan_unroll, int) or m.scan_unroll < 0:
    raise ValueError(f"config.model.scan_unroll={m.scan_unroll!r} must be an integer >= 0 "
                     "(layers per iteration of the layer scan; 0: auto, 1: a loop over "
                     "layers, the model's num_layers unrolls them all)")
  if not isinstance(m.loss_chunk, int) or m.loss_chunk < 0:
    raise ValueError(f"config.model.loss_chunk={m.loss_chunk!r} must be an integer >= 0 "
                     "(time steps per vocab chunk of the loss; 0: the default, 128)")
  if m.rope_scaling is not None:
    hf.check_rope_scaling(m.rope_scaling)
  for key in ("router_aux_loss_coef", "router_z_loss_coef"):
    if m[key] is not None and not m[key] >= 0:
      raise ValueError(f"config.model.{key}={m[key]} must be >= 0")
  sizes = [config.mesh[a] for a in MESH_AXES]
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: sizes must be positive, with at most one -1; got "
                     f"{config.mesh.to_dict()}")
  if not config.stages:
    raise ValueError("config.stages is empty: add at least one stage, e.g. "
                     "config.stages.sft = jaxsft.config.stage(lr=1e-5, data=dict(datasets=[...]))")
  for name, s in config.stages.items():
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
      raise ValueError(f"config.stages.{name}: a stage's name names its directory "
                       "(stages/NAME/); use letters, digits, '_' and '-' only")
    validate_stage(name, s)
  _check_unmergeable(config)
  _check_head_order(config)
  if config.export.dtype is not None:
    _one_of(config.export.dtype, DTYPES, "config.export.dtype")


def _check_head_order(config: ml_collections.ConfigDict) -> None:
  """A cls or reward stage replaces the language-model head with its own, so
  only a stage of the same objective can follow it (the trainer would refuse
  the next one only once this one had trained)."""
  names = list(config.stages.keys())
  for a, b in zip(names, names[1:]):
    head, then = config.stages[a].objective, config.stages[b].objective
    if head in ("cls", "reward") and then != head:
      raise ValueError(f"config.stages.{b}: objective {then!r} cannot follow stage {a!r} "
                       f"(objective {head!r}), whose {head} head replaces the model's "
                       "language-model head: put language-model stages first, and start a "
                       "head of another kind from a causal LM")


def _check_unmergeable(config: ml_collections.ConfigDict) -> None:
  """Prompt/prefix tuning and bottleneck adapters have no merged form: nothing
  can follow them but more of the same, and they cannot be exported as HF weights."""
  names = list(config.stages.keys())
  for a, b in zip(names, names[1:]):
    sa, sb = config.stages[a], config.stages[b]
    if sa.method in peft_methods.UNMERGEABLE and (
        sb.method != sa.method
        or peft_methods.adapters_for(sa.method, sa.peft) != peft_methods.adapters_for(
            sb.method, sb.peft)):
      raise ValueError(
          f"config.stages.{b}: stage {a!r} trains {sa.method!r}, which cannot be merged into "
          f"the weights, so stage {b!r} cannot start from a plain model; give {b!r} the same "
          f"method and peft settings, or make {a!r} the last stage")
  last = config.stages[names[-1]]
  if config.export.hf and last.method in peft_methods.UNMERGEABLE:
    raise ValueError(
        f"config.export.hf: the last stage trains {last.method!r}, which has no merged Hugging "
        "Face form; set export.hf=False and use python -m jaxsft.export --peft"
        + (" (bottleneck adapters have no PEFT format either: keep the jaxsft checkpoint)"
           if last.method == "adapter" else ""))


def _validate_data(where: str, s) -> None:
  """What a later stage would otherwise only check once its data are built,
  after the stages before it have trained: the data keys' values, the
  dataset specs, the templates named (a tokenizer's own needs the tokenizer,
  checked then) and the eval dataset a ``METRIC/DATASET`` best_metric names."""
  try:
    resolved = data_pipeline.resolve_config(s.data)
    for spec in [resolved, *resolved["datasets"], *resolved["eval_datasets"]]:
      template = spec.get("template")
      if template is not None and template != "tokenizer":
        data_templates.get_template(template)
  except ValueError as e:
    msg = str(e)
    raise ValueError(f"{where}.{msg}" if msg.startswith("data.") else
                     f"{where}.data: {msg}") from None
  train, held_out = data_pipeline.dataset_names(resolved)
  selection.check_datasets(s.best_metric, (train if resolved["eval_fraction"] else []) + held_out,
                           where)


def validate_stage(name: str, s: ml_collections.ConfigDict) -> None:
  where = f"config.stages.{name}"
  _check_keys(s, stage_defaults(), where)
  _check_keys(s.data, stage_defaults().data, f"{where}.data")
  _check_keys(s.peft, stage_defaults().peft, f"{where}.peft")
  _one_of(s.objective, OBJECTIVES, f"{where}.objective", LATER_OBJECTIVES)
  _one_of(s.method, METHODS, f"{where}.method")
  peft_methods.validate(s.method, s.peft, where)
  _one_of(s.schedule, SCHEDULES, f"{where}.schedule")
  if not s.data.datasets:
    raise ValueError(f"{where}.data.datasets is empty: list the files this stage trains on")
  for key in ("datasets", "eval_datasets"):
    for i, spec in enumerate(s.data[key]):
      path = spec if isinstance(spec, str) else spec.get("path")
      if path is not None:
        try:
          data_sources.locate(str(path))
        except ValueError as e:
          raise ValueError(f"{where}.data.{key}[{i}]: {e}") from None
  _validate_data(where, s)
  if not (isinstance(s.lr, (int, float)) and math.isfinite(s.lr) and s.lr > 0):
    raise ValueError(f"{where}.lr={s.lr} must be a finite positive number")
  for pattern, scale in dict(s.lr_groups or {}).items():
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{where}.lr_groups: {pattern!r} is not a valid regex ({e})") from None
    if not isinstance(scale, (int, float)) or scale < 0:
      raise ValueError(f"{where}.lr_groups[{pattern!r}]={scale!r} must be a number >= 0")
  if s.epochs is not None and s.epochs <= 0 or s.steps is not None and s.steps <= 0:
    raise ValueError(f"{where}: epochs and steps must be positive")
  if s.batch_tokens is not None:
    if s.batch_tokens % s.seq_len:
      raise ValueError(f"{where}.batch_tokens={s.batch_tokens} is not a multiple of "
                       f"seq_len={s.seq_len}")
  elif s.batch_size < 1:
    raise ValueError(f"{where}.batch_size={s.batch_size} must be at least 1")
  if s.grad_accum < 1 or batch_size(s) % s.grad_accum:
    raise ValueError(f"{where}: batch of {batch_size(s)} sequences is not divisible into "
                     f"grad_accum={s.grad_accum} micro-batches")
  if not 0 <= s.warmup_ratio < 1:
    raise ValueError(f"{where}.warmup_ratio={s.warmup_ratio} must be in [0, 1)")
  if not 0 <= s.min_lr_ratio <= 1:
    raise ValueError(f"{where}.min_lr_ratio={s.min_lr_ratio} must be in [0, 1]")
  alpha = s.neftune_noise_alpha
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
    raise ValueError(f"{where}.neftune_noise_alpha={alpha!r} must be a number >= 0 (0: off; "
                     "NEFTune's paper uses 5-15)")
  scale = s.loss_scale
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < 2.0**64:
    raise ValueError(f"{where}.loss_scale={scale!r} must be a positive number (float16 "
                     "training's initial loss scale, e.g. 1024)")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints", "seq_len",
              "loss_scale_interval"):
    if s[key] < 1:
      raise ValueError(f"{where}.{key}={s[key]} must be at least 1")
  _validate_generate_eval(where, s)
  selection.validate(s, where)
  if s.eval_every and not (s.data.eval_fraction or s.data.eval_datasets):
    raise ValueError(f"{where}.eval_every={s.eval_every} needs evaluation data: set "
                     "data.eval_fraction or data.eval_datasets")


def generate_eval(s: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A stage's ``generate_eval`` with defaults for the keys it leaves out (a
  config that assigns a dict replaces the defaults rather than updating them)."""
  g = ml_collections.ConfigDict(stage_defaults().generate_eval)
  g.update(dict(s.generate_eval))
  return g


def _validate_generate_eval(where: str, s: ml_collections.ConfigDict) -> None:
  _check_keys(s.generate_eval, stage_defaults().generate_eval, f"{where}.generate_eval")
  g = generate_eval(s)
  if not g.every:
    return
  if g.every < 0:
    raise ValueError(f"{where}.generate_eval.every={g.every} must be >= 0 (0 = off)")
  if s.objective not in ("lm", "sft"):
    raise ValueError(f"{where}.generate_eval: a {s.objective} stage trains a head that does not "
                     "generate; evaluate it with eval_every (accuracy) instead")
  if not g.path:
    raise ValueError(f"{where}.generate_eval.path: set the file of rows to answer (chats whose "
                     "last answer is the reference JSON, or label rows)")
  try:
    data_sources.locate(str(g.path))
  except ValueError as e:
    raise ValueError(f"{where}.generate_eval.path: {e}") from None
  for key in ("max_new_tokens", "batch_size") + (("examples",) if g.examples is not None else ()):
    if g[key] < 1:
      raise ValueError(f"{where}.generate_eval.{key}={g[key]} must be at least 1")


def batch_size(s: ml_collections.ConfigDict) -> int:
  """Sequences per optimizer step."""
  return s.batch_tokens // s.seq_len if s.batch_tokens is not None else s.batch_size
