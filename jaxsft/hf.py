"""Hugging Face import and export: ``config.json`` <-> ModelConfig, safetensors <-> params.

One key table (``_KEYS``) says, for every jaxsft parameter, which Hugging Face
tensor holds it and in what layout; import and export both read it. The layout
is written in the parameter's own axis letters: ``q_dnh`` is stored by HF as
``q_proj.weight`` of shape [N*H, D], layout ``"nh,d"``. Axes of the parameter
that the layout lacks are spelled out in the tensor name instead: the stacked
layer axis L as ``{layer}``, and the expert axis e of Mixtral's experts as
``{expert}``.

Import puts every tensor straight onto its target sharding, one layer (of one
expert) at a time: the host holds a single HF tensor while it is read, and each
stacked parameter is filled in place on device. Export gathers one tensor at a
time and writes it into its shard before the next (``save_tensors``), so the
host holds one tensor, not a shard. Only safetensors are read:
pickled checkpoints (``pytorch_model.bin``) are refused, never unpickled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
# Importing ml_dtypes registers bfloat16 with numpy, which safetensors needs to
# hand out bf16 tensors as numpy arrays.
import ml_dtypes  # noqa: F401
import numpy as np
import safetensors
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft import sharding as sharding_lib
from jaxsft.models import llama
from jaxsft.models.model_config import ModelConfig, ROPE_TYPES

PathLike = str | os.PathLike

# HF model_type -> jaxsft family. Yi ships as "llama" today; its first
# releases said "Yi" (with the norms named ln1/ln2, see _LEGACY_NAMES).
_FAMILIES = {"llama": "llama", "yi": "llama", "mistral": "mistral", "qwen2": "qwen2",
             "mixtral": "mixtral"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}
# A model with a task head (models/heads.py) is the family's *ForSequenceClassification.
_HEAD_SUFFIX = "ForSequenceClassification"

# transformers' defaults for the keys a config.json may leave out.
_HF_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048),
    "mistral": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=131072,
                    num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768),
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    router_aux_loss_coef=0.001),
}

# The parameters each RoPE type reads; transformers ignores any others too.
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"),
}
assert set(_ROPE_KEYS) == set(ROPE_TYPES)

# Fields of ModelConfig that are numeric/execution policy rather than architecture.
# The router loss coefficients count as policy: they only shape training, and a
# run may override the one config.json carries.
_POLICY_FIELDS = ("param_dtype", "dtype", "remat", "scan_unroll", "attention",
                  "fused_projections", "moe_dispatch",
                  "moe_capacity_factor", "loss_chunk",
                  "router_aux_loss_coef", "router_z_loss_coef")
_PARAM_DTYPES = ("float32", "bfloat16", "float16")
_SAFETENSORS_DTYPES = {"F32", "F16", "BF16", "F64"}

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Tokenizer files worth carrying along (whichever exist); code files named in
# tokenizer_config.json's auto_map come too.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
_TOKENIZER_DIRS = ("additional_chat_templates",)

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"


# ----------------------------------------------------------------------------- config

def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def run_artifact(path: PathLike) -> str | None:
  """Why ``path`` is not a model though a user may take it for one: a
  training run's directory or one of its resume checkpoints; else None."""
  d = pathlib.Path(path)
  if (d / "stages").is_dir():
    finals = sorted(str(f) for f in d.glob("stages/*/final"))
    return (f"{d} is a jaxsft training run, not a model: give a stage's model, "
            f"{d}/stages/NAME/final (here: {', '.join(finals) or 'none yet'}), or the run's "
            "Hugging Face export")
  if (d / "_CHECKPOINT_METADATA").is_file() and (d / "state").is_dir():
    return (f"{d} is a training checkpoint (optimizer state and data position, read when a "
            "stage resumes), not a model: a stage's model is its stages/NAME/final, written "
            "when the stage ends")
  return None


def _model_dir(path: PathLike) -> pathlib.Path:
  d = pathlib.Path(path)
  if not d.is_dir():
    raise ValueError(f"model directory {d} does not exist (or is not a directory)")
  if run_artifact(d):
    raise ValueError(run_artifact(d))
  if not (d / CONFIG_FILE).is_file():
    raise ValueError(f"{d} has no {CONFIG_FILE}; a Hugging Face model directory needs one "
                     "(the output of save_pretrained)")
  return d


def _token_ids(value) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _rope_from_hf(hf: dict, family: str, max_pos: int, where: str):
  """(rope_theta, normalized rope_scaling) from transformers-5 ``rope_parameters``
  or the legacy ``rope_theta`` + ``rope_scaling`` (whose type key may be "type")."""
  # transformers lets rope_scaling win where both are present.
  rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  if rope and all(isinstance(v, dict) for v in rope.values()):
    raise ValueError(f"{where}: per-layer-type RoPE parameters ({sorted(rope)}) are not "
                     "supported")
  theta = rope.get("rope_theta", hf.get("rope_theta", _HF_DEFAULTS[family]["rope_theta"]))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in _ROPE_KEYS:
    raise ValueError(f"{where}: RoPE type {kind!r} is not supported; supported types: "
                     f"{sorted(_ROPE_KEYS)}")
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(f"{where}: partial_rotary_factor={partial} is not supported (only 1.0)")
  params = {k: rope[k] for k in _ROPE_KEYS[kind] if rope.get(k) is not None}
  if kind in ("linear", "dynamic", "llama3") and "factor" not in params:
    raise ValueError(f"{where}: RoPE type {kind!r} needs a 'factor'")
  if kind in ("yarn", "llama3"):
    # As transformers does: the pre-training length defaults to max_position_embeddings.
    params.setdefault("original_max_position_embeddings", max_pos)
  if kind == "yarn":
    params.setdefault("factor", max_pos / params["original_max_position_embeddings"])
  if kind == "llama3":
    for k in ("low_freq_factor", "high_freq_factor"):
      if k not in params:
        raise ValueError(f"{where}: RoPE type 'llama3' needs {k!r}")
  scaling = () if kind == "default" else tuple(sorted({"rope_type": kind, **params}.items()))
  return float(theta), scaling


# Context extension by a run's model.rope_scaling (``extend_context``): the
# types that scale every position the same way in training and inference.
CONTEXT_EXTENSIONS = ("linear", "yarn", "llama3")


def check_rope_scaling(spec, where: str = "config.model.rope_scaling"):
  """Refuse a ``model.rope_scaling`` that ``extend_context`` cannot apply,
  before any model is read: a type name of CONTEXT_EXTENSIONS, or a dict whose
  ``rope_type`` is one, with a ``factor`` >= 1. Dynamic NTK scaling changes
  RoPE's base with the longest position of each call, so packed training rows
  would each see a different one: refused, with why. Returns ``spec`` as a
  plain str or dict (a ConfigDict converted)."""
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  kind = spec.get("rope_type", spec.get("type")) if isinstance(spec, Mapping) else spec
  if kind not in CONTEXT_EXTENSIONS or not isinstance(spec, (str, Mapping)):
    raise ValueError(
        f"{where}={spec!r}: give one of {CONTEXT_EXTENSIONS} or transformers' rope_scaling "
        "dict with one of them as its rope_type"
        + (" (dynamic NTK scaling changes RoPE's base with the longest position of each "
           "call, so packed training rows would each see a different one; fine-tune with "
           "linear, yarn or llama3)" if kind == "dynamic" else ""))
  if isinstance(spec, Mapping):
    factor = spec.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
      raise ValueError(f"{where}: 'factor' must be a number >= 1, got {factor!r}")
  return spec


def extend_context(cfg: ModelConfig, spec, seq_len: int,
                   where: str = "config.model.rope_scaling") -> ModelConfig:
  """``cfg`` with RoPE scaling for training at ``seq_len`` tokens, past the
  model's context (``max_position_embeddings``), as LLaMA-Factory's
  ``rope_scaling`` does it (``check_rope_scaling`` says what ``spec`` may be).

  A type name: factor = ceil(seq_len / context); yarn and llama3 get the old
  context as their original_max_position_embeddings, llama3 low/high
  frequency factors 1 and 4; where seq_len fits the context already, ``cfg``
  is returned unchanged (also when ``cfg`` scales RoPE so already, as the
  checkpoint of an earlier such run does). A dict (transformers' ``rope_scaling``)
  is applied as given, unless ``cfg`` has that type and factor already. Either way the context becomes the old one times the factor, and the
  exported config.json carries both, so transformers computes what was trained.
  """
  spec = check_rope_scaling(spec, where)
  old = cfg.max_position_embeddings
  if isinstance(spec, str):
    if cfg.rope_dict().get("rope_type") == spec and seq_len <= old:
      return cfg  # scaled so already, e.g. a checkpoint of an earlier such run
    if cfg.rope_scaling:
      raise ValueError(
          f"{where}={spec!r}: the model already scales RoPE ({cfg.rope_dict()}); drop "
          f"{where} to keep that, or give transformers' rope_scaling dict with every "
          "parameter to replace it, e.g. {'rope_type': 'linear', 'factor': 4.0}")
    if seq_len <= old:
      return cfg
    rope: dict[str, Any] = {"rope_type": spec, "factor": float(math.ceil(seq_len / old))}
    if spec == "llama3":
      rope.update(low_freq_factor=1.0, high_freq_factor=4.0)
  else:
    rope = dict(spec)
    have = cfg.rope_dict()
    if (have.get("rope_type") == rope.get("rope_type", rope.get("type"))
        and have.get("factor") == rope.get("factor")):
      # Scaled so already (a checkpoint of an earlier such run): applying it
      # again would take the grown context for the original one.
      return cfg
  # yarn's and llama3's original_max_position_embeddings default to the old context.
  _, scaling = _rope_from_hf({"rope_scaling": rope}, cfg.family, old, where)
  return cfg.replace(rope_scaling=scaling,
                     max_position_embeddings=int(old * dict(scaling)["factor"]))


def stored_dtype(model_dir: PathLike) -> str | None:
  """The dtype a Hugging Face model directory's config.json says its weights
  are stored in (``dtype``, or ``torch_dtype`` before transformers 5), if it
  is one jaxsft computes in; else None."""
  hf = _read_json(_model_dir(model_dir) / CONFIG_FILE)
  name = hf.get("dtype") or hf.get("torch_dtype")
  return name if name in _PARAM_DTYPES else None


def config_from_hf(source: PathLike | Mapping[str, Any], **policy) -> ModelConfig:
  """A ModelConfig from a Hugging Face ``config.json`` (a dict, or a model directory).

  ``policy`` sets the non-architectural fields (param_dtype, dtype, remat, scan_unroll,
  attention). From a directory, the token ids of
  ``generation_config.json`` are merged in (chat models often list their extra
  end-of-turn ids only there).
  """
  unknown = sorted(set(policy) - set(_POLICY_FIELDS))
  if unknown:
    raise ValueError(f"config_from_hf: {unknown} are not policy fields; policy fields are "
                     f"{list(_POLICY_FIELDS)}")
  generation = {}
  if isinstance(source, Mapping):
    hf, where = dict(source), "config.json"
  else:
    d = _model_dir(source)
    hf, where = _read_json(d / CONFIG_FILE), str(d / CONFIG_FILE)
    if (d / GENERATION_CONFIG_FILE).is_file():
      generation = _read_json(d / GENERATION_CONFIG_FILE)

  model_type = str(hf.get("model_type", ""))
  family = _FAMILIES.get(model_type.lower())
  if family is None:
    raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported model "
                     f"types: {sorted(_FAMILIES)}")
  defaults = _HF_DEFAULTS[family]

  def get(key, default=None):
    value = hf.get(key)
    return defaults.get(key, default) if value is None else value

  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if hf.get(k) is None]
  if missing:
    raise ValueError(f"{where}: missing required keys {missing}")
  hidden_act = get("hidden_act", "silu")
  if hidden_act not in ("silu", "swish"):  # transformers' "swish" is SiLU too
    raise ValueError(f"{where}: hidden_act={hidden_act!r} is not supported (only silu)")
  heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
  head_dim = hf.get("head_dim")
  if head_dim is None:
    if hidden % heads:
      raise ValueError(f"{where}: hidden_size={hidden} is not divisible by "
                       f"num_attention_heads={heads}, and head_dim is not given")
    head_dim = hidden // heads
  max_pos = get("max_position_embeddings")
  rope_theta, rope_scaling = _rope_from_hf(hf, family, max_pos, where)

  arch: dict[str, Any] = {}
  if family == "llama":
    arch.update(qkv_bias=bool(get("attention_bias", False)),
                o_bias=bool(get("attention_bias", False)), mlp_bias=bool(get("mlp_bias", False)))
  elif family == "qwen2":
    arch.update(qkv_bias=True)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if hf.get("use_sliding_window") and i >= get("max_window_layers", 28)
        else "full_attention" for i in range(hf["num_hidden_layers"])]
    if "sliding_attention" in layer_types:
      raise ValueError(f"{where}: Qwen2 sliding-window attention (use_sliding_window=true on "
                       "some layers) is not supported; set use_sliding_window to false if the "
                       "model was trained with full attention")
  else:  # mistral, mixtral
    arch.update(sliding_window=get("sliding_window"))
  if family == "mixtral":
    arch.update(num_experts=int(get("num_local_experts")),
                num_experts_per_tok=int(get("num_experts_per_tok")),
                router_aux_loss_coef=float(get("router_aux_loss_coef")))

  arch.update(_head_from_hf(hf, where))
  eos = _token_ids(hf.get("eos_token_id"))
  eos += [t for t in _token_ids(generation.get("eos_token_id")) if t not in eos]
  bos, pad = (generation.get(k) if hf.get(k) is None else hf[k]
              for k in ("bos_token_id", "pad_token_id"))
  try:
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hidden,
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=get("num_key_value_heads", heads), head_dim=head_dim,
        rms_norm_eps=float(get("rms_norm_eps")), rope_theta=rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(get("tie_word_embeddings", False)), hidden_act="silu",
        initializer_range=float(get("initializer_range", 0.02)),
        bos_token_id=bos, eos_token_ids=tuple(eos), pad_token_id=pad, **{**arch, **policy})
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _head_from_hf(hf: dict, where: str) -> dict[str, Any]:
  """The head fields of ModelConfig from a *ForSequenceClassification config
  (none for other architectures: every config carries a default id2label)."""
  architectures = hf.get("architectures") or []
  if not any(str(a).endswith(_HEAD_SUFFIX) for a in architectures):
    return {}
  id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
  num_labels = int(hf.get("num_labels") or len(id2label) or 2)
  if id2label and sorted(id2label) != list(range(num_labels)):
    raise ValueError(f"{where}: id2label has ids {sorted(id2label)}, not 0..{num_labels - 1}")
  problem_type = hf.get("problem_type") or (
      "regression" if num_labels == 1 else "single_label_classification")
  names = () if problem_type == "regression" else tuple(
      id2label.get(i, f"LABEL_{i}") for i in range(num_labels))
  return dict(num_labels=num_labels, label_names=names, problem_type=problem_type)


def _dtype_name(dtype) -> str:
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = str(dtype)
  if name not in _PARAM_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {list(_PARAM_DTYPES)}")
  return name


def _eos_value(cfg: ModelConfig):
  """eos_token_id as HF writes it: one id, a list of several, or None."""
  eos = list(cfg.eos_token_ids)
  return eos[0] if len(eos) == 1 else (eos or None)


def config_to_hf(cfg: ModelConfig, dtype=None) -> dict[str, Any]:
  """The ``config.json`` dict that transformers loads as ``cfg``'s architecture.

  ``dtype`` (default ``cfg.param_dtype``) is the weights' dtype as saved.
  The keys that transformers 5 renamed (``rope_theta``/``rope_scaling``,
  ``torch_dtype``) are written too, so that older tools read the same model.
  """
  rope = cfg.rope_dict()
  arch = _ARCHITECTURES[cfg.family]
  if cfg.has_head:
    arch = arch.replace("ForCausalLM", _HEAD_SUFFIX)
  hf: dict[str, Any] = {
      "architectures": [arch],
      "model_type": cfg.family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": cfg.hidden_act,
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "initializer_range": cfg.initializer_range,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default", **rope},
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope or None,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": _eos_value(cfg),
      "pad_token_id": cfg.pad_token_id,
      "attention_dropout": 0.0,
      "use_cache": True,
      "dtype": _dtype_name(dtype or cfg.param_dtype),
  }
  hf["torch_dtype"] = hf["dtype"]  # the name before transformers 5
  if cfg.family == "llama":
    if cfg.qkv_bias != cfg.o_bias:
      raise ValueError(f"a llama config expresses q/k/v and o biases together (attention_bias); "
                       f"got qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}")
    hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  else:
    # The other families fix their biases: Qwen2 has q/k/v biases, the rest none.
    want = (cfg.family == "qwen2", False, False)
    if (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) != want:
      raise ValueError(f"family {cfg.family!r} needs (qkv_bias, o_bias, mlp_bias)={want}; got "
                       f"{(cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias)}")
  if cfg.family == "qwen2":
    if cfg.sliding_window is not None:
      raise ValueError("Qwen2 sliding-window attention is not supported")
    hf.update(use_sliding_window=False, sliding_window=None,
              max_window_layers=cfg.num_layers)
  elif cfg.family in ("mistral", "mixtral"):
    hf.update(sliding_window=cfg.sliding_window)
  elif cfg.sliding_window is not None:
    raise ValueError(f"family {cfg.family!r} has no sliding window; got "
                     f"sliding_window={cfg.sliding_window}")
  if cfg.family == "mixtral":
    hf.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
              router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False)
  elif cfg.is_moe:
    raise ValueError(f"family {cfg.family!r} has no experts; got num_experts={cfg.num_experts}")
  if cfg.has_head:
    if cfg.pad_token_id is None:
      raise ValueError("a sequence-classification model needs pad_token_id: transformers pools "
                       "each row at its last token that is not padding")
    names = cfg.label_names or tuple(f"LABEL_{i}" for i in range(cfg.num_labels))
    hf.update(num_labels=cfg.num_labels, problem_type=cfg.problem_type,
              id2label={str(i): n for i, n in enumerate(names)},
              label2id={n: i for i, n in enumerate(names)})
  return hf


def _generation_config(cfg: ModelConfig) -> dict[str, Any]:
  gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": _eos_value(cfg),
         "pad_token_id": cfg.pad_token_id}
  return {k: v for k, v in gen.items() if v is not None}


# ----------------------------------------------------------------------------- the key table

@dataclasses.dataclass(frozen=True)
class _Key:
  path: str  # the jaxsft parameter, e.g. "layers/attn/q_dnh"
  hf: str  # the HF tensor name; {layer} and {expert} are filled in per tensor
  layout: str  # the HF tensor's dims in the parameter's axis letters: "nh,d" is [N*H, D]


_L = "model.layers.{layer}."
_KEYS = (
    _Key("embed/embedding_vd", "model.embed_tokens.weight", "v,d"),
    _Key("layers/attn_norm/scale_d", _L + "input_layernorm.weight", "d"),
    _Key("layers/attn/q_dnh", _L + "self_attn.q_proj.weight", "nh,d"),
    _Key("layers/attn/k_dkh", _L + "self_attn.k_proj.weight", "kh,d"),
    _Key("layers/attn/v_dkh", _L + "self_attn.v_proj.weight", "kh,d"),
    _Key("layers/attn/o_nhd", _L + "self_attn.o_proj.weight", "d,nh"),
    _Key("layers/attn/q_bias_nh", _L + "self_attn.q_proj.bias", "nh"),
    _Key("layers/attn/k_bias_kh", _L + "self_attn.k_proj.bias", "kh"),
    _Key("layers/attn/v_bias_kh", _L + "self_attn.v_proj.bias", "kh"),
    _Key("layers/attn/o_bias_d", _L + "self_attn.o_proj.bias", "d"),
    _Key("layers/mlp_norm/scale_d", _L + "post_attention_layernorm.weight", "d"),
    _Key("layers/mlp/gate_df", _L + "mlp.gate_proj.weight", "f,d"),
    _Key("layers/mlp/up_df", _L + "mlp.up_proj.weight", "f,d"),
    _Key("layers/mlp/down_fd", _L + "mlp.down_proj.weight", "d,f"),
    _Key("layers/mlp/gate_bias_f", _L + "mlp.gate_proj.bias", "f"),
    _Key("layers/mlp/up_bias_f", _L + "mlp.up_proj.bias", "f"),
    _Key("layers/mlp/down_bias_d", _L + "mlp.down_proj.bias", "d"),
    # Mixtral, in the per-expert layout its checkpoints use (transformers 5 included).
    _Key("layers/moe/router_de", _L + "block_sparse_moe.gate.weight", "e,d"),
    _Key("layers/moe/gate_edf", _L + "block_sparse_moe.experts.{expert}.w1.weight", "f,d"),
    _Key("layers/moe/up_edf", _L + "block_sparse_moe.experts.{expert}.w3.weight", "f,d"),
    _Key("layers/moe/down_efd", _L + "block_sparse_moe.experts.{expert}.w2.weight", "d,f"),
    _Key("final_norm/scale_d", "model.norm.weight", "d"),
    _Key("lm_head/kernel_dv", "lm_head.weight", "v,d"),
    _Key("score/kernel_dc", "score.weight", "c,d"),  # *ForSequenceClassification
)
_KEY_BY_PATH = {k.path: k for k in _KEYS}
# Parameter axes spelled out in tensor names rather than stored as a dimension.
_NAMED_AXES = {"L": "layer", "e": "expert"}
# Older names of a tensor, tried when the current name is absent (Yi's first releases).
_LEGACY_NAMES = (("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2"))
# Tensors a checkpoint may carry that no parameter needs: rotary caches that
# older transformers saved.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Param:
  """One parameter with its HF tensors: ``positions`` index its named (leading)
  axes, and each position is stored as one HF tensor of shape ``hf_shape``."""
  key: _Key
  shape: tuple[int, ...]
  named: str  # the leading axes given by tensor name, e.g. "L" or "Le"
  inner: str  # the remaining axes, e.g. "dnh"
  sizes: Mapping[str, int]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(self.sizes[a] for a in group) for group in self.key.layout.split(","))

  def positions(self) -> Iterator[tuple[int, ...]]:
    return itertools.product(*(range(self.sizes[a]) for a in self.named))

  def hf_name(self, position: tuple[int, ...]) -> str:
    return self.key.hf.format(**{_NAMED_AXES[a]: i for a, i in zip(self.named, position)})

  def from_hf(self, tensor: np.ndarray) -> np.ndarray:
    """One HF tensor -> this parameter's inner axes (a view where possible)."""
    stored = self.key.layout.replace(",", "")
    x = tensor.reshape([self.sizes[a] for a in stored])
    return x.transpose([stored.index(a) for a in self.inner])

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    stored = self.key.layout.replace(",", "")
    return np.ascontiguousarray(x.transpose([self.inner.index(a) for a in stored])
                                ).reshape(self.hf_shape)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _params_of(cfg: ModelConfig) -> tuple[list[_Param], Any]:
  """The parameters of ``cfg``'s model (in tree-flattening order) and the tree structure."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(llama.abstract_params(cfg))
  params = []
  for path, leaf in flat:
    key = _KEY_BY_PATH[_path_str(path)]  # a parameter missing from _KEYS is a bug here
    letters = sharding_lib.axis_letters(tuple(key.path.split("/")), leaf.ndim)
    stored = key.layout.replace(",", "")
    named, inner = letters[:len(letters) - len(stored)], letters[len(letters) - len(stored):]
    assert sorted(inner) == sorted(stored) and set(named) <= set(_NAMED_AXES), key
    params.append(_Param(key, tuple(leaf.shape), named, inner, dict(zip(letters, leaf.shape))))
  return params, treedef


# ----------------------------------------------------------------------------- import

class _SafetensorsDir:
  """The safetensors of a HF model directory: which file holds which tensor,
  headers checked up front, files opened (memory-mapped) once."""

  def __init__(self, model_dir: pathlib.Path):
    self.dir = model_dir
    self._open: dict[str, Any] = {}
    if (model_dir / INDEX_FILE).is_file():
      index = _read_json(model_dir / INDEX_FILE)
      weight_map = index.get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{model_dir / INDEX_FILE} has no 'weight_map'")
      self.files = sorted(set(weight_map.values()))
      for f in self.files:
        if not (model_dir / f).is_file():
          raise ValueError(f"shard {f} listed in {model_dir / INDEX_FILE} is missing from "
                           f"{model_dir}; copy the complete checkpoint")
    elif (model_dir / SINGLE_FILE).is_file():
      self.files = [SINGLE_FILE]
    else:
      pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
      if pickles:
        raise ValueError(
            f"{model_dir} holds only pickled weights ({', '.join(pickles)}); jaxsft reads "
            "safetensors only and never unpickles (unpickling runs arbitrary code). Convert "
            "them once where you trust the file: load it in transformers and call "
            "model.save_pretrained(out_dir, safe_serialization=True)")
      raise ValueError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    # Every tensor name -> its file, from the files themselves (an index may be stale).
    self.location: dict[str, str] = {}
    for f in self.files:
      for name in self._handle(f).keys():
        self.location.setdefault(name, f)

  def _handle(self, filename: str):
    if filename not in self._open:
      path = self.dir / filename
      try:
        self._open[filename] = safetensors.safe_open(str(path), framework="numpy")
      except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path}: {e}. The file is truncated or corrupt; "
                         "download or copy it again") from None
    return self._open[filename]

  def resolve(self, name: str) -> str:
    """The stored name of tensor ``name`` (trying legacy names), or a ValueError."""
    candidates = [name] + [name.replace(f".{new}.", f".{old}.") for new, old in _LEGACY_NAMES
                           if f".{new}." in name]
    for candidate in candidates:
      if candidate in self.location:
        return candidate
    hint = (" (config.json says tie_word_embeddings=false; is it a tied model?)"
            if name == "lm_head.weight" else "")
    raise ValueError(f"tensor {name} not found in {self.dir} (searched "
                     f"{', '.join(self.files)}){hint}")

  def check(self, name: str, shape: tuple[int, ...]) -> None:
    info = self._handle(self.location[name]).get_slice(name)
    got, dtype = tuple(info.get_shape()), info.get_dtype()
    where = self.dir / self.location[name]
    if got != shape:
      raise ValueError(f"tensor {name} in {where} has shape {list(got)}, but config.json "
                       f"implies {list(shape)}")
    if dtype not in _SAFETENSORS_DTYPES:
      raise ValueError(f"tensor {name} in {where} has dtype {dtype}; only floating point "
                       f"weights ({sorted(_SAFETENSORS_DTYPES)}) are supported, not quantized "
                       "ones")

  def read(self, name: str) -> np.ndarray:
    return self._handle(self.location[name]).get_tensor(name)


def _without_leading(s: jax.sharding.Sharding, n: int, ndim: int) -> jax.sharding.Sharding:
  """``s`` for one slice along the first ``n`` axes of an ``ndim``-dim array."""
  if n == 0 or not isinstance(s, NamedSharding):
    return s
  spec = tuple(s.spec) + (None,) * (ndim - len(s.spec))
  return NamedSharding(s.mesh, P(*spec[n:]))


def _place(read, param: _Param, target: jax.sharding.Sharding | None, dtype) -> jax.Array:
  """Build one parameter on ``target``; ``read(position)`` gives one HF tensor.

  A parameter with named axes (stacked layers, experts) is filled in place on
  device: a zero buffer with the target sharding gets each slice written into
  it by a donating update, so neither the host nor the device holds two copies.
  ``target`` None: a numpy array on the host, filled the same way.
  """
  if target is None:
    out = np.empty(param.shape, dtype)
    for position in param.positions():
      out[position] = param.from_hf(read(position)).astype(dtype)
    return out

  def piece(position):
    host = param.from_hf(read(position)).astype(dtype)
    return jax.make_array_from_callback(
        host.shape, _without_leading(target, len(param.named), len(param.shape)),
        lambda index: host[index])

  if not param.named:
    return piece(())
  buf = jnp.zeros(param.shape, dtype, device=target)
  for position in param.positions():
    buf = _write_slice(buf, piece(position), *position)
  return buf


@functools.partial(jax.jit, donate_argnums=0)
def _write_slice(buf, piece, *position):
  """``buf`` with ``piece`` written at ``position`` of its leading axes (in place:
  ``buf`` is donated, and its sharding carries over to the result)."""
  starts = tuple(position) + (0,) * piece.ndim
  return jax.lax.dynamic_update_slice(buf, piece.reshape((1,) * len(position) + piece.shape),
                                      starts)


def load_params(model_dir: PathLike, cfg: ModelConfig | None = None, mesh=None, rules=None,
                dtype=None, dtypes=None, host=None) -> tuple[ModelConfig, Any]:
  """Read a Hugging Face model directory's safetensors into jaxsft parameters.

  ``cfg`` defaults to ``config_from_hf(model_dir)``. Each parameter lands
  directly on its sharding from ``sharding.param_shardings(…, mesh, rules)``
  (one device without a mesh), cast to ``dtype`` (default ``cfg.param_dtype``;
  the returned config records it). All tensor names, shapes and dtypes are
  checked before anything is placed; tensors the config does not describe are
  an error, except rotary caches and a tied model's duplicate ``lm_head``.
  ``dtypes``: a tree of the parameters' structure giving some leaves another
  dtype than the config's (``optim.load_dtypes``: frozen weights read straight
  in the compute dtype). ``host``: a tree of bools of the same structure; its
  True leaves stay on the host as numpy arrays (QLoRA quantizes them onto the
  devices one layer at a time, ``jaxsft.peft.nf4.store``).
  """
  model_dir = _model_dir(model_dir)
  if cfg is None:
    cfg = config_from_hf(model_dir)
  if dtype is not None:
    cfg = cfg.replace(param_dtype=_dtype_name(dtype))
  files = _SafetensorsDir(model_dir)
  params, treedef = _params_of(cfg)

  names: dict[str, dict[tuple[int, ...], str]] = {}  # parameter -> position -> stored name
  for param in params:
    names[param.key.path] = {}
    for position in param.positions():
      stored = files.resolve(param.hf_name(position))
      files.check(stored, param.hf_shape)
      names[param.key.path][position] = stored
  used = {n for per_param in names.values() for n in per_param.values()}
  ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
  extra = sorted(n for n in set(files.location) - used - ignored
                 if not n.endswith(_IGNORED_SUFFIXES))
  if extra:
    raise ValueError(
        f"{model_dir} has {len(extra)} tensor(s) that are not part of the model its "
        f"config.json describes, e.g. {extra[:5]}; check config.json (attention_bias, mlp_bias, "
        "tie_word_embeddings, num_hidden_layers, model_type) against the weights")

  if mesh is None:
    shardings = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(params)
  else:
    shardings = jax.tree_util.tree_leaves(sharding_lib.param_shardings(
        llama.abstract_params(cfg), mesh, rules or sharding_lib.DEFAULT_RULES))
  leaf_dtypes = [jnp.dtype(cfg.param_dtype)] * len(params)
  if dtypes is not None:
    leaf_dtypes, structure = jax.tree_util.tree_flatten(dtypes)
    if structure != treedef:
      raise ValueError(f"load_params(dtypes=...) must have the parameters' structure "
                       f"{treedef}, not {structure}")
  if host is not None:
    shardings = [None if h else t for t, h in zip(shardings, jax.tree_util.tree_leaves(host))]
  leaves = []
  for param, target, dtype in zip(params, shardings, leaf_dtypes):
    stored = names[param.key.path]
    leaves.append(_place(lambda position: files.read(stored[position]), param, target,
                         jnp.dtype(dtype)))
  return cfg, jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- export

def check_output_dir(out_dir: PathLike, overwrite: bool = False) -> None:
  """Refuse ``out_dir`` as what ``staged_dir`` would replace: a path that is
  not a directory, a non-empty directory without ``overwrite``, and, even
  with it, a directory holding a training run (its ``stages/`` and
  ``config.json``: every checkpoint of the run would go)."""
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise ValueError(f"output path {out_dir} exists and is not a directory")
  if (out_dir / "stages").is_dir() and (out_dir / CONFIG_FILE).is_file():
    raise ValueError(f"output directory {out_dir} holds a jaxsft training run (stages/, "
                     f"{CONFIG_FILE}); it is never replaced, with or without overwrite: "
                     "choose another directory")
  if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
    raise ValueError(f"output directory {out_dir} is not empty; choose another one or "
                     "overwrite it (overwrite=True; --overwrite on the command line)")


@contextlib.contextmanager
def staged_dir(out_dir: PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
  """A fresh sibling directory that becomes ``out_dir`` when the block succeeds.

  Whatever the block writes appears at ``out_dir`` all at once, so a crash
  never leaves a half-written export behind. An existing non-empty
  ``out_dir`` is replaced only with ``overwrite``.
  """
  out_dir = pathlib.Path(out_dir)
  check_output_dir(out_dir, overwrite)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
  try:
    yield tmp
    tmp.chmod(0o755)  # mkdtemp makes it private
    if out_dir.exists():
      old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
      out_dir.rename(old)
      tmp.rename(out_dir)
      shutil.rmtree(old)
    else:
      tmp.rename(out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_tokenizer(path: PathLike, trust_remote_code: bool = False):
  """``transformers.AutoTokenizer`` from ``path``; any failure becomes one
  ValueError naming the directory (and the flag, when custom code may be why)."""
  import transformers  # noqa: PLC0415  (slow to import; only tokenizer users pay)

  try:
    return transformers.AutoTokenizer.from_pretrained(str(path),
                                                      trust_remote_code=trust_remote_code)
  except Exception as e:  # noqa: BLE001 — any load failure is a problem with the input files
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    d = pathlib.Path(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json"):
      try:
        if (d / name).is_file():
          json.loads((d / name).read_text())
      except (OSError, ValueError) as bad:
        raise ValueError(f"could not load a tokenizer from {path}: {d / name} is not valid JSON "
                         f"({bad}); the file is damaged: copy the tokenizer files again") from None
    custom = any((d / name).is_file() and "auto_map" in (d / name).read_text()
                 for name in ("tokenizer_config.json", CONFIG_FILE))
    hint = "" if trust_remote_code or not custom else (
        "; it names code of its own (auto_map): if you trust it, pass --trust-remote-code "
        "(config.model.trust_remote_code in a run config)")
    raise ValueError(f"could not load a tokenizer from {path}: {first}{hint}") from None


def copy_tokenizer_files(src: PathLike, dst: PathLike) -> list[str]:
  """Copy the tokenizer files found in directory ``src`` into ``dst``; their names.

  Code files that tokenizer_config.json's ``auto_map`` names come along:
  copying runs nothing, and loading them still takes trust_remote_code=True.
  """
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if not src.is_dir():
    raise ValueError(f"tokenizer source {src} is not a directory")
  names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
  if not names:
    raise ValueError(f"no tokenizer files in {src} (looked for {', '.join(TOKENIZER_FILES)})")
  if "tokenizer_config.json" in names:
    auto_map = _read_json(src / "tokenizer_config.json").get("auto_map") or {}
    for ref in auto_map.values():
      for class_ref in ref if isinstance(ref, list) else [ref]:
        # "module.Class" is local code; "repo--module.Class" lives in another repo.
        if class_ref and "--" not in class_ref:
          module = class_ref.rsplit(".", 1)[0] + ".py"
          if (src / module).is_file() and module not in names:
            names.append(module)
  dst.mkdir(parents=True, exist_ok=True)
  for n in names:
    shutil.copy2(src / n, dst / n)
  for d in _TOKENIZER_DIRS:
    if (src / d).is_dir():
      shutil.copytree(src / d, dst / d, dirs_exist_ok=True)
      names.append(d)
  return names


def _write_json(path: pathlib.Path, obj) -> None:
  path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# Slices one tensor out of a stacked (possibly sharded) parameter; the index is
# traced, so this compiles once per parameter shape rather than once per layer.
_take = jax.jit(lambda x, *position: x[position])


def _host_tensor(leaf, position: tuple[int, ...]) -> np.ndarray:
  if isinstance(leaf, jax.Array):
    return np.asarray(_take(leaf, *position) if position else leaf)
  return np.asarray(leaf)[position]


def _matching_leaves(params, plan: list[_Param]) -> dict[str, Any]:
  """The leaves of ``params`` by path, checked against the parameters ``cfg`` implies."""
  leaves = {_path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  expected = {p.key.path: p for p in plan}
  missing, unexpected = sorted(set(expected) - set(leaves)), sorted(set(leaves) - set(expected))
  if missing or unexpected:
    raise ValueError(f"params do not match the model config: missing {missing}, "
                     f"unexpected {unexpected}")
  for path, leaf in leaves.items():
    if tuple(leaf.shape) != expected[path].shape:
      raise ValueError(f"parameter {path} has shape {list(leaf.shape)}, but the model config "
                       f"implies {list(expected[path].shape)}")
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      raise ValueError(f"parameter {path} spans several processes; save_params gathers on a "
                       "single process")
  return leaves


def _hf_order(plan: list[_Param], num_layers: int) -> list[tuple[_Param, tuple[int, ...]]]:
  """Every (parameter, position) in transformers' order: embeddings, then layer by
  layer, then the final norm and head, so that shards hold whole layers."""
  rank = {k.path: i for i, k in enumerate(_KEYS)}

  def layer(param, position):
    if param.named:
      return position[0]
    return -1 if param.key.path.startswith("embed/") else num_layers

  items = [(param, position) for param in plan for position in param.positions()]
  return sorted(items, key=lambda it: (layer(*it), rank[it[0].key.path], it[1]))


def save_params(params, cfg: ModelConfig, out_dir: PathLike, tokenizer_src: PathLike | None = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype=None,
                overwrite: bool = False) -> pathlib.Path:
  """Write ``params`` as a Hugging Face model directory that transformers loads.

  Writes config.json, generation_config.json, safetensors in ``dtype``
  (default ``cfg.param_dtype``) — one ``model.safetensors``, or shards of at
  most ``max_shard_bytes`` with ``model.safetensors.index.json`` — and the
  tokenizer files of ``tokenizer_src``. Tensors are gathered to the host one at
  a time, and the directory appears only once complete (see ``staged_dir``).
  """
  leaves = _matching_leaves(params, _params_of(cfg)[0])
  return save_tensors(lambda path, position: _host_tensor(leaves[path], position), cfg,
                      out_dir, tokenizer_src, max_shard_bytes, dtype, overwrite)


def save_tensors(tensor: Callable[[str, tuple[int, ...]], np.ndarray], cfg: ModelConfig,
                 out_dir: PathLike, tokenizer_src: PathLike | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype=None,
                 overwrite: bool = False) -> pathlib.Path:
  """``save_params`` for weights that are not held as a tree: ``tensor(path,
  position)`` returns, on the host, the parameter ``path`` (``"layers/mlp/up_df"``)
  of a ``cfg`` model at ``position`` of its named axes (``(layer,)``, ``(layer,
  expert)``, ``()``), in the parameter's layout. It is called once per Hugging
  Face tensor, in transformers' order (embeddings, layer by layer, then the
  rest), and each tensor is written before the next is asked for, so a source
  that reads or computes one layer at a time holds no more than that layer
  and one tensor."""
  dtype = _dtype_name(dtype or cfg.param_dtype)
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive; got {max_shard_bytes}")
  hf_config = config_to_hf(cfg, dtype)
  plan, _ = _params_of(cfg)
  itemsize = jnp.dtype(dtype).itemsize

  shards: list[list[tuple[_Param, tuple[int, ...]]]] = [[]]
  shard_bytes = 0
  for param, position in _hf_order(plan, cfg.num_layers):
    nbytes = math.prod(param.hf_shape) * itemsize
    if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append((param, position))
    shard_bytes += nbytes

  with staged_dir(out_dir, overwrite) as tmp:
    _write_json(tmp / CONFIG_FILE, hf_config)
    if not cfg.has_head:  # a classifier does not generate
      _write_json(tmp / GENERATION_CONFIG_FILE, _generation_config(cfg))
    weight_map = {}
    for i, shard in enumerate(shards):
      filename = (SINGLE_FILE if len(shards) == 1
                  else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")

      def tensors(shard=shard):
        for param, position in shard:
          host = np.asarray(tensor(param.key.path, position)).astype(dtype, copy=False)
          if host.shape != tuple(param.shape[len(position):]):
            raise ValueError(f"parameter {param.key.path} at {position} has shape "
                             f"{list(host.shape)}; the model config implies "
                             f"{list(param.shape[len(position):])}")
          yield param.to_hf(host)

      names = [param.hf_name(position) for param, position in shard]
      _write_safetensors(tmp / filename, [(n, p.hf_shape) for n, (p, _) in zip(names, shard)],
                         dtype, tensors())
      weight_map.update(dict.fromkeys(names, filename))
    if len(shards) > 1:
      total = sum(math.prod(p.hf_shape) for shard in shards for p, _ in shard)
      _write_json(tmp / INDEX_FILE, {
          "metadata": {"total_parameters": total, "total_size": total * itemsize},
          "weight_map": weight_map})
    if tokenizer_src is not None:
      copy_tokenizer_files(tokenizer_src, tmp)
  return pathlib.Path(out_dir)


_SAFETENSORS_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _write_safetensors(path: pathlib.Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str,
                       tensors: Iterator[np.ndarray]) -> None:
  """A safetensors file of the tensors ``entries`` names (name, shape), all of
  ``dtype``, their data taken from ``tensors`` in the same order and written
  as each arrives: the host holds one tensor, not the file (``safetensors``'
  own writer takes them all at once). The format: an 8-byte little-endian
  header length, the JSON header (names, dtypes, shapes, byte offsets; padded
  with spaces to 8 bytes, as safetensors writes it), then the data."""
  itemsize = np.dtype(dtype).itemsize
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape in entries:
    nbytes = math.prod(shape) * itemsize
    header[name] = {"dtype": _SAFETENSORS_DTYPE_NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for (name, shape), x in zip(entries, tensors, strict=True):
      # Every platform JAX runs on is little-endian, as safetensors stores data.
      assert x.shape == tuple(shape) and x.dtype == np.dtype(dtype), (name, x.shape, x.dtype)
      f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
