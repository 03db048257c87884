"""What a stage's ``method`` means: the adapters it adds to the model, and which
parameters train.

Methods (a stage's ``method``; the knobs live in ``stage.peft``):
  full            every weight trains
  lora, dora      LoRA / DoRA factors on ``peft.targets`` train; the base is frozen
  full_then_lora  ``full`` for the first ``peft.switch_at`` of the stage's steps, then
                  LoRA on top of the updated weights (the trainer does the switch)
  freeze          only the last ``peft.train_layers`` layers and/or the modules
                  matching ``peft.train_modules`` train (the frozen layers are split
                  into their own stack for the stage: no gradient flows through them)
  adapter         bottleneck adapters (size ``peft.bottleneck_size``) train
  prompt          prompt tuning: ``peft.virtual_tokens`` learned embeddings before every
                  example, initialized from the tokens of ``peft.prompt_init_text``
                  (repeated or cut to length, as PEFT's TEXT init) or at random
  p_tuning        the same virtual tokens, produced by a prompt encoder
                  (``peft.encoder`` "mlp" or "lstm", hidden width ``peft.encoder_hidden``,
                  default the model width)
  prefix          prefix tuning: ``peft.virtual_tokens`` learned key/value slots per layer
                  (reparameterized through an MLP of width ``peft.prefix_projection_hidden``
                  when > 0)

Whatever the method, ``peft.train_modules`` (a regex over parameter paths such
as ``"embed|final_norm"``) adds parameters to the trainable set, and task
heads always train.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections.config_dict import placeholder

from jaxsft import sharding as sharding_lib
from jaxsft.models import llama
from jaxsft.models.model_config import (ALL_LINEAR, EXPERT_TARGETS, LORA_INITS, LORA_TARGETS,
                                        PRINCIPAL_INITS, Adapters, ModelConfig)
from jaxsft.peft import lora as lora_lib
from jaxsft.peft import nf4

METHODS = ("full", "lora", "dora", "full_then_lora", "freeze", "adapter", "prompt", "p_tuning",
           "prefix")
LORA_METHODS = ("lora", "dora", "full_then_lora")
# Methods whose additions have no exact merged form (the model stays a jaxsft one).
UNMERGEABLE = ("prompt", "p_tuning", "prefix", "adapter")
# Methods whose trainable weights a PEFT adapter directory can hold.
PEFT_FORMATS = ("lora", "dora", "full_then_lora", "prompt", "p_tuning", "prefix")


def default_config() -> ml_collections.ConfigDict:
  """``stage.peft``: the knobs of every method (each method reads its own)."""
  return ml_collections.ConfigDict(dict(
      # A name list, "all-linear" or a regex: any type, so a list can replace the string.
      targets=ml_collections.FieldReference("all-linear", field_type=object), rank=16, alpha=32.0, rslora=False, dropout=0.0, init="kaiming",
      switch_at=0.2, lora_lr_scale=1.0, loraplus_lr_ratio=placeholder(float),
      bottleneck_size=64,
      virtual_tokens=20, prompt_init_text=placeholder(str), encoder="mlp",
      encoder_hidden=placeholder(int), prefix_projection_hidden=0,
      train_layers=placeholder(int), train_modules=placeholder(str),
      frozen_dtype="auto", quantization=placeholder(str), double_quant=True))


def lora_targets(spec, where: str = "stage.peft.targets") -> tuple[str, ...]:
  """Resolve ``peft.targets``: "all-linear", a list of module names, or a regex
  matched against the module names (``"q_proj|v_proj"``)."""
  if isinstance(spec, str):
    if spec == "all-linear":
      return ALL_LINEAR
    try:
      pattern = re.compile(spec)
    except re.error as e:
      raise ValueError(f"{where}={spec!r} is not a valid regex ({e})") from None
    found = tuple(t for t in LORA_TARGETS if pattern.fullmatch(t))
    if not found:
      raise ValueError(f"{where}={spec!r} matches no module; available: "
                       f"{', '.join(LORA_TARGETS)} (or 'all-linear')")
    return found
  names = tuple(spec)
  missing = [n for n in names if n not in LORA_TARGETS]
  if missing or not names:
    raise ValueError(f"{where}: {missing or 'an empty list'} names no module; available: "
                     f"{', '.join(LORA_TARGETS)} (or 'all-linear')")
  return names


FROZEN_DTYPES = ("auto", "compute", "param")


def frozen_dtype_choice(peft, where: str = "stage") -> str:
  """``peft.frozen_dtype`` ("auto" where unset), checked; ValueError naming the key."""
  choice = "auto" if peft is None else peft.get("frozen_dtype", "auto")
  if choice not in FROZEN_DTYPES:
    raise ValueError(f"{where}.peft.frozen_dtype={choice!r} is not 'auto', 'compute' (frozen "
                     "weights held in model.dtype) or 'param' (in model.param_dtype)")
  return choice


def validate(method: str, peft, where: str) -> None:
  """Check ``stage.peft`` for ``method``; ValueError naming the key."""
  frozen_dtype_choice(peft, where)
  _check_quantization(method, peft, where)
  if method in ("prompt", "p_tuning", "prefix") and peft.virtual_tokens < 1:
    raise ValueError(f"{where}.peft.virtual_tokens={peft.virtual_tokens} must be a positive "
                     "integer (the number of virtual tokens, e.g. 20)")
  if method == "p_tuning":
    if peft.encoder not in ("mlp", "lstm"):
      raise ValueError(f"{where}.peft.encoder={peft.encoder!r} is not 'mlp' or 'lstm'")
    if peft.encoder_hidden is not None and peft.encoder_hidden < 1:
      raise ValueError(f"{where}.peft.encoder_hidden={peft.encoder_hidden} must be positive "
                       "(or None: the model width)")
  if method == "prefix" and peft.prefix_projection_hidden < 0:
    raise ValueError(f"{where}.peft.prefix_projection_hidden={peft.prefix_projection_hidden} "
                     "must be >= 0 (0: no reparameterization)")
  if method == "adapter" and peft.bottleneck_size < 1:
    raise ValueError(f"{where}.peft.bottleneck_size={peft.bottleneck_size} must be a positive "
                     "integer")
  if method == "freeze" and peft.train_layers is not None and peft.train_layers < 1:
    raise ValueError(f"{where}.peft.train_layers={peft.train_layers} must be a positive number "
                     "of layers (or None: only peft.train_modules train)")
  if method in LORA_METHODS:
    lora_targets(peft.targets, f"{where}.peft.targets")
    if peft.rank <= 0:
      raise ValueError(f"{where}.peft.rank={peft.rank} must be a positive integer")
    if peft.alpha <= 0:
      raise ValueError(f"{where}.peft.alpha={peft.alpha} must be positive")
    if not 0 <= peft.dropout < 1:
      raise ValueError(f"{where}.peft.dropout={peft.dropout} must be in [0, 1)")
    if peft.init not in LORA_INITS:
      raise ValueError(f"{where}.peft.init={peft.init!r} is not one of {', '.join(LORA_INITS)}")
    if peft.init in PRINCIPAL_INITS:
      other = [t for t in lora_targets(peft.targets) if t not in ALL_LINEAR]
      if other or method == "dora":
        raise ValueError(
            f"{where}.peft.init={peft.init!r} (as PEFT's) takes the factors of the decoder's "
            f"linear projections from their weights, for plain LoRA: "
            + (f"leave {other} out of peft.targets" if other else "use method 'lora'")
            + " or another init")
    _check_expert_targets(method, peft, where)
  if method in LORA_METHODS and peft.loraplus_lr_ratio is not None and peft.loraplus_lr_ratio <= 0:
    raise ValueError(f"{where}.peft.loraplus_lr_ratio={peft.loraplus_lr_ratio} must be positive "
                     "(LoRA+: the B factors' lr over the A factors', e.g. 16), or None")
  if method == "full_then_lora" and not peft.lora_lr_scale > 0:
    raise ValueError(f"{where}.peft.lora_lr_scale={peft.lora_lr_scale} must be positive (the "
                     "LoRA phase's lr multiplier, e.g. 5)")
  if method == "full_then_lora" and not 0 < peft.switch_at < 1:
    raise ValueError(f"{where}.peft.switch_at={peft.switch_at} must be a fraction of the "
                     "stage's steps in (0, 1), e.g. 0.2")
  if method == "freeze" and peft.train_layers is None and peft.train_modules is None:
    raise ValueError(f"{where}: method 'freeze' needs peft.train_layers (train the last N "
                     "layers) and/or peft.train_modules (a regex over parameter paths)")
  if peft.train_modules is not None:
    try:
      re.compile(peft.train_modules)
    except re.error as e:
      raise ValueError(f"{where}.peft.train_modules={peft.train_modules!r} is not a valid "
                       f"regex ({e})") from None


QUANTIZATIONS = ("nf4",)


def quantization(stage) -> str | None:
  """``stage.peft.quantization``: "nf4" (QLoRA's 4-bit frozen base) or None."""
  peft = stage.get("peft")
  return None if peft is None else peft.get("quantization")


def _check_quantization(method: str, peft, where: str) -> None:
  quant = peft.get("quantization")
  if quant is None:
    return
  if quant not in QUANTIZATIONS:
    raise ValueError(f"{where}.peft.quantization={quant!r} is not 'nf4' (QLoRA's 4-bit "
                     "NormalFloat, bitsandbytes' bnb_4bit_quant_type='nf4') or None")
  if method != "lora":
    raise ValueError(f"{where}.peft.quantization={quant!r} stores the frozen base of a LoRA "
                     f"stage in 4 bits (QLoRA); method {method!r} is not 'lora': use method "
                     "'lora' or set peft.quantization=None")
  if peft.init in PRINCIPAL_INITS:
    raise ValueError(f"{where}.peft.quantization={quant!r} with peft.init={peft.init!r}: "
                     "PiSSA/OLoRA take their factors from the full-precision weight and leave "
                     "a residual base; quantizing that residual is not supported; use "
                     "peft.init='kaiming' or 'gaussian'")


def _check_expert_targets(method: str, peft, where: str) -> None:
  """Expert LoRA is plain LoRA: PEFT's has no dropout and no DoRA (lora.py)."""
  experts = [t for t in lora_targets(peft.targets) if t in EXPERT_TARGETS]
  if experts and peft.dropout:
    raise ValueError(f"{where}.peft.dropout={peft.dropout}: LoRA on the experts ({experts}) has "
                     "no dropout (nor has PEFT's, so it could not be exported); set "
                     f"{where}.peft.dropout=0 or leave the experts out of peft.targets")
  if experts and method == "dora":
    raise ValueError(f"{where}.method='dora': DoRA on the experts ({experts}) is not supported "
                     "(PEFT has no DoRA on expert parameters); use method 'lora', or leave the "
                     "experts out of peft.targets")


def _check_targets_exist(cfg: ModelConfig, targets: tuple[str, ...], spec, where: str) -> None:
  """Targets the model has no weight for are an error (an MoE model has no
  dense MLP; a dense model no experts), except the MLP part of "all-linear"
  on an MoE model, which means the attention there (as PEFT's all-linear)."""
  if cfg.is_moe and spec != "all-linear":
    dense = [t for t in targets if t in ("gate_proj", "up_proj", "down_proj")]
    if dense:
      raise ValueError(f"{where}.peft.targets names {dense}, but this MoE model's feed-forward "
                       "is its experts: target 'expert_gate_up' and/or 'expert_down' instead")
  if not cfg.is_moe:
    experts = [t for t in targets if t in EXPERT_TARGETS]
    if experts:
      raise ValueError(f"{where}.peft.targets names {experts}, but this model has no experts "
                       "(not an MoE model); target gate_proj/up_proj/down_proj instead")
  # Without an lm_head weight a LoRA on it would be created nowhere: the stage
  # would train nothing there, and export an adapter without it.
  if "lm_head" in targets and cfg.has_head:
    raise ValueError(f"{where}.peft.targets names 'lm_head', but this stage's {cfg.problem_type} "
                     "head replaces the model's lm_head (the head itself trains in full): leave "
                     "lm_head out of peft.targets")
  if "lm_head" in targets and cfg.tie_word_embeddings:
    raise ValueError(f"{where}.peft.targets names 'lm_head', but this model ties its output "
                     "layer to its input embedding (tie_word_embeddings): it has no lm_head "
                     "weight of its own. Leave lm_head out of peft.targets, or train the "
                     "embedding with peft.train_modules")


def adapters_for(method: str, peft, phase: int = 1, num_layers: int | None = None,
                 where: str = "stage") -> Adapters | None:
  """The adapters a stage with ``method`` adds (``phase`` 0 is the full part of
  ``full_then_lora``); ``num_layers`` is the model's (freeze tuning needs it)."""
  if method in ("lora", "dora") or (method == "full_then_lora" and phase == 1):
    return Adapters(lora_targets=lora_targets(peft.targets), lora_rank=int(peft.rank),
                    lora_alpha=float(peft.alpha), rslora=bool(peft.rslora),
                    dora=method == "dora", lora_dropout=float(peft.dropout),
                    lora_init=peft.init)
  if method == "prompt":
    return Adapters(prompt_tokens=int(peft.virtual_tokens))
  if method == "p_tuning":
    return Adapters(prompt_tokens=int(peft.virtual_tokens), prompt_encoder=peft.encoder,
                    prompt_encoder_hidden=int(peft.encoder_hidden or 0))
  if method == "prefix":
    return Adapters(prefix_tokens=int(peft.virtual_tokens),
                    prefix_projection_hidden=int(peft.prefix_projection_hidden))
  if method == "adapter":
    return Adapters(bottleneck_size=int(peft.bottleneck_size))
  if method == "freeze" and peft.train_layers is not None:
    if num_layers is not None and peft.train_layers > num_layers:
      raise ValueError(f"{where}.peft.train_layers={peft.train_layers} exceeds the model's "
                       f"{num_layers} layers; use at most {num_layers}")
    frozen = (num_layers or 0) - int(peft.train_layers)
    return Adapters(frozen_layers=frozen) if frozen > 0 else None
  return None


def virtual_tokens(stage) -> int:
  """Slots the data pipeline reserves before every example of ``stage`` (prompt
  tuning and P-tuning; 0 otherwise)."""
  return int(stage.peft.virtual_tokens) if stage.method in ("prompt", "p_tuning") else 0


def split_layers(params, frozen: int):
  """The single ``layers`` stack → ``layers_frozen`` (the first ``frozen``) and ``layers``."""
  out = dict(params)
  stack = out.pop("layers")
  out["layers_frozen"] = jax.tree_util.tree_map(lambda x: x[:frozen], stack)
  out["layers"] = jax.tree_util.tree_map(lambda x: x[frozen:], stack)
  return out


def canonical(cfg: ModelConfig, params) -> tuple[ModelConfig, Any]:
  """The checkpoint layout: one ``layers`` stack (freeze tuning's split undone)."""
  a = cfg.adapters
  if a is None or not a.frozen_layers:
    return cfg, params
  out = dict(params)
  first = out.pop("layers_frozen")
  out["layers"] = jax.jit(lambda u, v: jax.tree_util.tree_map(
      lambda x, y: jnp.concatenate([x, y], axis=0), u, v))(first, out["layers"])
  a = dataclasses.replace(a, frozen_layers=0)
  return cfg.replace(adapters=None if a == Adapters() else a), out


def add_params(cfg: ModelConfig, params, rng: jax.Array):
  """``params`` plus freshly initialized parameters for ``cfg.adapters`` (the
  existing arrays are passed through untouched). Initialization follows each
  module's own initializers, run by Flax for the missing parameters only."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  positions, segment_ids = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32)

  def init(params, rng):
    _, variables = llama.Transformer(cfg).apply(
        {"params": params}, tokens, positions, segment_ids,
        method=llama.Transformer.init_all, mutable=["params"], rngs={"params": rng})
    return variables["params"]

  return jax.jit(init, donate_argnums=0)(params, rng)


def principal_init(params, adapters: Adapters):
  """PiSSA or OLoRA (``adapters.lora_init``): every targeted projection's
  factors from its weight, which becomes the residual (``lora.principal_factors``).
  The base weights' buffers are donated: the model is held once."""
  def walk(module):
    out = dict(module)
    for weight, (_, n_in) in lora_lib.WEIGHTS.items():
      name_a, name_b, _ = lora_lib.factor_names(weight)
      if name_a in module:
        out[name_a], out[name_b], out[weight] = lora_lib.principal_factors(
            module[weight], module[name_a], module[name_b], n_in, adapters)
    return {k: walk(v) if isinstance(v, dict) else v for k, v in out.items()}

  return jax.jit(walk, donate_argnums=0)(params)


def merge(cfg: ModelConfig, params, donate: bool = False) -> tuple[ModelConfig, Any]:
  """Fold LoRA/DoRA into the base weights: a plain model computing the same
  function. Adapters with no exact merged form are refused. ``donate``: the
  base weights' buffers become the merged ones (``params`` is unusable
  after), so merging holds the model once, not twice."""
  cfg, params = canonical(cfg, params)
  a = cfg.adapters
  if a is None:
    return cfg, params
  check_mergeable(cfg)
  fold = functools.partial(merged_module, adapters=a)
  params = _plain(params)
  if not donate:
    return cfg.replace(adapters=None), jax.jit(fold)(params)
  # Only the base weights are donated: the factors have no output to alias.
  merged = jax.jit(lambda base, factors: fold(_joined(base, factors)), donate_argnums=0)(
      base_params(params), _adapter_params(params))
  return cfg.replace(adapters=None), merged


def check_mergeable(cfg: ModelConfig) -> None:
  """Refuse adapters of ``cfg`` that have no exact merged form, saying what to
  do instead."""
  a = cfg.adapters
  if a is None:
    return
  if a.bottleneck_size or a.prompt_tokens or a.prefix_tokens:
    kind = ("bottleneck adapters" if a.bottleneck_size else
            "P-tuning" if a.prompt_encoder != "none" else
            "prompt tuning" if a.prompt_tokens else "prefix tuning")
    where = ("keep the jaxsft checkpoint (PEFT has no bottleneck adapter format)"
             if a.bottleneck_size else "export it with --peft (a PEFT adapter directory)")
    raise ValueError(f"{kind} cannot be merged into the base weights (the result is not a "
                     f"plain model); {where}")
  if "embed_tokens" in a.lora_targets and cfg.tie_word_embeddings:
    raise ValueError("LoRA on embed_tokens of a model with tied embeddings cannot be merged "
                     "exactly (the merged embedding would change the output layer too); "
                     "export with --peft instead")


def merged_module(module: dict, adapters: Adapters) -> dict:
  """``module`` (a dict of parameters and submodules, any leading axes: a
  whole layer stack or one layer) with the LoRA/DoRA factors ``adapters``
  describe folded into the weights they update, and removed."""
  out = dict(module)
  for weight, (_, n_in) in lora_lib.WEIGHTS.items():
    name_a, name_b, name_m = lora_lib.factor_names(weight)
    if name_a in module:
      out[weight] = lora_lib.merged_weight(module[weight], module[name_a], module[name_b],
                                           module.get(name_m), adapters, n_in)
      for n in (name_a, name_b, name_m):
        out.pop(n, None)
  if "embedding_lora_a_vr" in module:
    emb = module["embedding_vd"]
    out["embedding_vd"] = (emb.astype(jnp.float32) + adapters.lora_scale * jnp.matmul(
        module["embedding_lora_a_vr"].astype(jnp.float32),
        module["embedding_lora_b_rd"].astype(jnp.float32))).astype(emb.dtype)
    out.pop("embedding_lora_a_vr")
    out.pop("embedding_lora_b_rd")
  out = lora_lib.merge_experts(out, adapters)
  return {k: merged_module(v, adapters) if isinstance(v, dict) else v for k, v in out.items()}


def base_params(params):
  """``params`` without any adapter parameter: the frozen base model."""
  def strip(tree):
    return {k: strip(v) if hasattr(v, "items") else v for k, v in tree.items()
            if not is_adapter_name(k)}
  return strip(params)


def _adapter_params(params):
  """The adapter parameters of ``params`` (nested dicts; ``base_params``'
  complement)."""
  out = {}
  for k, v in params.items():
    if is_adapter_name(k):
      out[k] = v
    elif hasattr(v, "items") and (sub := _adapter_params(v)):
      out[k] = sub
  return out


def _joined(a, b):
  """Nested dicts ``a`` and ``b`` (disjoint leaves) as one."""
  out = dict(a)
  for k, v in b.items():
    out[k] = _joined(out[k], v) if k in out else v
  return out


def is_adapter_name(name: str) -> bool:
  """Whether a parameter (or module) named ``name`` belongs to an adapter:
  LoRA/DoRA factors, prompt/prefix encoders, bottleneck adapters."""
  return "_lora_" in name or name in ("prompt", "prefix") or name.startswith("adapter")


def _plain(tree):
  """Nested dicts (Flax may hand back FrozenDicts)."""
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def has_lora(params) -> bool:
  return any("_lora_" in sharding_lib.path_names(p)[-1]
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def canonical_path(path: tuple[str, ...]) -> str:
  """``path`` as the checkpoint names it: freeze tuning's ``layers_frozen`` stack
  is part of ``layers`` there, so path regexes (``train_modules``, ``lr_groups``)
  written against checkpoint paths match both stacks."""
  if path[-1].startswith(nf4.PREFIX):  # a part of a 4-bit weight: the weight's path
    path = path[:-1]
  name = "/".join(path)
  return "layers" + name[len("layers_frozen"):] if path[0] == "layers_frozen" else name


def trainable(path: tuple[str, ...], method: str, peft, params_have_lora: bool) -> bool:
  """Whether the parameter at ``path`` trains under ``method``."""
  name = canonical_path(path)
  if peft is not None and peft.train_modules and re.search(peft.train_modules, name):
    return True
  if path[0] in ("head", "score"):  # task heads always train
    return True
  leaf = path[-1]
  if method == "full" or (method == "full_then_lora" and not params_have_lora):
    return True
  if method in LORA_METHODS:
    return "_lora_" in leaf
  if method == "adapter":
    return any(p.startswith("adapter") for p in path)
  if method in ("prompt", "p_tuning"):
    return path[0] == "prompt"
  if method == "prefix":
    return path[0] == "prefix"
  if method == "freeze":  # the first L-N layers live in "layers_frozen" (split_layers)
    return path[0] == "layers" and peft.train_layers is not None
  raise AssertionError(method)


def _is_abstract(params) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(params))


def prepare(cfg: ModelConfig, params, stage, rng: jax.Array, phase: int = 1, tokenizer=None,
            where: str = "stage", place_base=None):
  """The model a stage trains: ``cfg``/``params`` with the adapters of
  ``stage.method`` added (``phase`` 0: the full part of ``full_then_lora``).

  A model that arrives with other adapters (an earlier LoRA stage) has them
  merged first, so every stage starts from the previous stage's function.
  ``params`` may be abstract (resuming): the result is then abstract too.
  ``tokenizer`` tokenizes ``peft.prompt_init_text`` (prompt tuning); errors
  name the config keys under ``where`` (e.g. "config.stages.sft").
  ``place_base(params)``, if given, transforms the base model's parameters
  after any merge and before the new adapters are added (QLoRA stores its
  frozen projections in 4 bits there, so that adding LoRA runs on them).
  """
  peft = stage.peft
  want = adapters_for(stage.method, peft, phase, cfg.num_layers, where)
  if want is not None and want.lora_targets:
    _check_targets_exist(cfg, want.lora_targets, peft.targets, where)
  abstract = _is_abstract(params)
  if cfg.adapters is not None and cfg.adapters != want:
    if abstract:
      cfg = cfg.replace(adapters=None)
      params = llama.abstract_params(cfg)
    else:
      cfg, params = merge(cfg, params)
  if place_base is not None and not abstract:
    params = place_base(params)
  if want is not None and cfg.adapters != want:
    cfg = cfg.replace(adapters=want)
    if abstract:
      params = llama.abstract_params(cfg)
    elif want.frozen_layers:  # freeze tuning adds nothing: it only splits the stack
      params = split_layers(params, want.frozen_layers)
    else:
      params = add_params(cfg, params, rng)
      if want.lora_init in PRINCIPAL_INITS:
        params = principal_init(params, want)
      if stage.method == "prompt" and peft.prompt_init_text:
        params = _init_prompt_from_text(params, peft.prompt_init_text, tokenizer, where)
  if peft.train_modules:
    _check_train_modules(params, peft.train_modules, where)
  return cfg, params


def _init_prompt_from_text(params, text: str, tokenizer, where: str):
  """PEFT's PromptTuningInit.TEXT: the embeddings of ``tokenizer(text)``'s ids,
  repeated or cut to the number of virtual tokens."""
  if tokenizer is None:
    raise ValueError(f"{where}.peft.prompt_init_text needs the run's tokenizer")
  ids = list(tokenizer(text)["input_ids"])
  if not ids:
    raise ValueError(f"{where}.peft.prompt_init_text={text!r} has no tokens")
  table = params["prompt"]["embedding_pd"]
  n = table.shape[0]
  ids = (ids * -(-n // len(ids)))[:n]
  out = dict(params)
  out["prompt"] = dict(out["prompt"])
  out["prompt"]["embedding_pd"] = params["embed"]["embedding_vd"][jnp.asarray(ids)].astype(
      table.dtype)
  return out


def _check_train_modules(params, pattern: str, where: str) -> None:
  names = [canonical_path(sharding_lib.path_names(p))
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if not any(re.search(pattern, n) for n in names):
    modules = sorted({n.rsplit("/", 1)[0] if "/" in n else n for n in names})
    raise ValueError(f"{where}.peft.train_modules={pattern!r} matches no parameter; parameter "
                     f"paths look like {names[0]!r}, modules: {', '.join(modules)}")


def switch_step(stage, total_steps: int, where: str = "stage") -> int | None:
  """The step after which ``full_then_lora`` changes to LoRA (None otherwise);
  at least one step on each side: a stage of one step is refused (its LoRA
  phase would be compiled and never run)."""
  if stage.method != "full_then_lora":
    return None
  if total_steps < 2:
    raise ValueError(f"{where}: method full_then_lora trains {total_steps} step(s), but needs at "
                     "least 2 (full fine-tuning, then LoRA): raise steps (or epochs), or use "
                     "method full")
  return min(max(int(round(stage.peft.switch_at * total_steps)), 1), total_steps - 1)
