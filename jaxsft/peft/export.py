"""Write a PEFT adapter directory (``peft.PeftModel.from_pretrained`` loads it).

The directory holds ``adapter_config.json`` (with ``base_model_name_or_path``)
and ``adapter_model.safetensors`` with PEFT's key names, e.g.
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``, plus the
tokenizer files. LoRA and DoRA factors are written per layer in PEFT's
layout (``lora_A`` [r, in], ``lora_B`` [out, r], ``lora_magnitude_vector``
[out]); see ``jaxsft.peft.lora`` for how they map. LoRA on MoE experts is
written as PEFT's LoRA on transformers' fused expert parameters
(``target_parameters``; see ``expert_lora_tensors``).

Prompt tuning, P-tuning and prefix tuning write PEFT's single tensor
``prompt_embeddings``: the [P, D] virtual embeddings (for P-tuning the
encoder's output, which PEFT uses in inference mode), or for prefix tuning
the [P, L·2·K·H] key/value prefixes (projection applied; PEFT's
``num_attention_heads`` and ``token_dim`` are the kv heads K and K·H, as
``get_peft_model`` sets them for a GQA model).

A model with a classification or reward head (a cls/reward stage) is PEFT's
``SEQ_CLS`` task: the trained ``score`` head is saved beside the LoRA factors
as ``base_model.model.score.weight`` [C, D] with ``modules_to_save: ["score"]``,
and ``seq_cls_config.json`` holds the keyword arguments (num_labels,
id2label, label2id, problem_type, pad_token_id) the base needs:
``AutoModelForSequenceClassification.from_pretrained(base, **kwargs)`` builds
a head of the right shape, whose random weights the adapter's then replace.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxsft import hf
from jaxsft.models import llama
from jaxsft.models.model_config import EXPERT_TARGETS, ModelConfig
from jaxsft.peft import lora as lora_lib
from jaxsft.peft import prompts as prompts_lib

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# In a jaxsft checkpoint: the HF model its frozen base weights are identical to.
BASE_FILE = "peft_base.json"

# Beside a SEQ_CLS adapter: the base model's from_pretrained keyword arguments.
SEQ_CLS_FILE = "seq_cls_config.json"
# In a stage's directory: its PiSSA/OLoRA factors as they started (a PEFT
# adapter directory), for ``to_plain_lora``.
LORA_INIT_DIR = "lora_init"

# Our module path (under layers/) -> the HF submodule that holds the projection.
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


def _np(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def lora_tensors(cfg: ModelConfig, params, dtype=np.float32) -> dict[str, np.ndarray]:
  """PEFT's state dict of the LoRA/DoRA factors in ``params``."""
  out: dict[str, np.ndarray] = {}
  prefix = "base_model.model"

  def emit(hf_module: str, a, b, m, n_in: int):
    r = a.shape[-1]
    out[f"{hf_module}.lora_A.weight"] = a.reshape(-1, r).T
    out[f"{hf_module}.lora_B.weight"] = b.reshape(r, -1).T
    if m is not None:
      out[f"{hf_module}.lora_magnitude_vector"] = m.reshape(-1)

  for group, module in params.get("layers", {}).items():
    for weight in lora_lib.WEIGHTS:
      name_a, name_b, name_m = lora_lib.factor_names(weight)
      if name_a not in module:
        continue
      a, b = _np(module[name_a]), _np(module[name_b])
      m = _np(module[name_m]) if name_m in module else None
      for i in range(a.shape[0]):
        hf_module = (f"{prefix}.model.layers.{i}.{_HF_MODULE[group]}."
                     f"{lora_lib.MODULE_OF[weight]}")
        emit(hf_module, a[i], b[i], None if m is None else m[i], lora_lib.WEIGHTS[weight][1])
  head = params.get("lm_head", {})
  name_a, name_b, _ = lora_lib.factor_names("kernel_dv")
  if name_a in head:
    emit(f"{prefix}.lm_head", _np(head[name_a]), _np(head[name_b]), None, 1)
  emb = params.get("embed", {})
  if "embedding_lora_a_vr" in emb:
    out[f"{prefix}.model.embed_tokens.lora_embedding_A"] = _np(emb["embedding_lora_a_vr"]).T
    out[f"{prefix}.model.embed_tokens.lora_embedding_B"] = _np(emb["embedding_lora_b_rd"]).T
  out.update(expert_lora_tensors(params))
  return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in out.items()}


def expert_lora_tensors(params) -> dict[str, np.ndarray]:
  """PEFT's tensors of the expert LoRA factors in ``params`` (fp32).

  PEFT (``ParamWrapper``) adapts transformers' ``mlp.experts.gate_up_proj``
  [E, 2F, D] and ``down_proj`` [E, D, F] with ``lora_A.weight`` [E·r, in]
  (row e·r + j: expert e's j-th rank row) and ``lora_B.weight`` [out, r·E]
  (column j·E + e), and the delta of expert e is ``B_e·A_e`` in HF's
  [out, in]. gate_up's out axis is [gate F; up F], so its B is our gate and up
  B side by side. Two adapted parameters of one module nest: the first
  declared (gate_up_proj) becomes ``experts.base_layer``, the outer one
  ``experts``.
  """
  out: dict[str, np.ndarray] = {}
  moe = params.get("layers", {}).get("moe", {})
  present = [(hf_param, name_a, bs) for hf_param, name_a, bs in
             lora_lib.EXPERT_FACTORS.values() if name_a in moe]
  for depth, (_, name_a, bs) in enumerate(present):
    a = _np(moe[name_a])  # [L, E, in, r]
    b = np.concatenate([_np(moe[name_b]) for name_b in bs], axis=-1)  # [L, E, r, out]
    wrapper = "experts" + ".base_layer" * (len(present) - 1 - depth)
    for i in range(a.shape[0]):
      module = f"base_model.model.model.layers.{i}.mlp.{wrapper}"
      e, _, r = a[i].shape
      out[f"{module}.lora_A.weight"] = a[i].transpose(0, 2, 1).reshape(e * r, -1)
      out[f"{module}.lora_B.weight"] = b[i].transpose(2, 1, 0).reshape(-1, r * e)
  return out


def lora_config(cfg: ModelConfig, base_model: str | None) -> dict[str, Any]:
  a = cfg.adapters
  modules = [t for t in a.lora_targets if t not in EXPERT_TARGETS]
  if cfg.is_moe:  # its feed-forward is the experts: "all-linear" meant the attention there
    modules = [t for t in modules if t not in ("gate_proj", "up_proj", "down_proj")]
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": a.lora_rank, "lora_alpha": a.lora_alpha, "lora_dropout": a.lora_dropout,
      "target_modules": sorted(modules) or None, "use_rslora": a.rslora, "use_dora": a.dora,
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
      "init_lora_weights": True, "modules_to_save": None,
  }
  experts = [f"mlp.experts.{lora_lib.EXPERT_FACTORS[t][0]}" for t in EXPERT_TARGETS
             if t in a.lora_targets]
  if experts:
    config["target_parameters"] = experts
  return config


def prompt_config(cfg: ModelConfig, base_model: str | None) -> dict[str, Any]:
  """PEFT's adapter_config.json of the prompt-learning method in ``cfg.adapters``."""
  a = cfg.adapters
  common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "num_transformer_submodules": 1, "num_layers": cfg.num_layers,
            "inference_mode": True, "modules_to_save": None}
  if a.prefix_tokens:
    return {**common, "peft_type": "PREFIX_TUNING", "num_virtual_tokens": a.prefix_tokens,
            "token_dim": cfg.num_kv_heads * cfg.head_dim,
            "num_attention_heads": cfg.num_kv_heads,
            # The projection is applied: the file holds the prefixes themselves.
            "prefix_projection": False,
            "encoder_hidden_size": a.prefix_projection_hidden or cfg.hidden_size}
  out = {**common, "num_virtual_tokens": a.prompt_tokens, "token_dim": cfg.hidden_size,
         "num_attention_heads": cfg.num_heads}
  if a.prompt_encoder == "none":
    return {**out, "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM"}
  return {**out, "peft_type": "P_TUNING",
          "encoder_reparameterization_type": a.prompt_encoder.upper(),
          "encoder_hidden_size": a.prompt_encoder_hidden or cfg.hidden_size,
          "encoder_num_layers": 2, "encoder_dropout": 0.0}


def prompt_tensors(cfg: ModelConfig, params, dtype=np.float32) -> dict[str, np.ndarray]:
  """PEFT's state dict of a prompt-learning adapter: ``prompt_embeddings``."""
  model = llama.Transformer(cfg)
  if cfg.adapters.prefix_tokens:
    keys, values = model.apply({"params": params}, method=llama.Transformer.prefix_kv)
    table = prompts_lib.prefix_flat(keys, values)
  else:
    table = _np(model.apply({"params": params}, method=llama.Transformer.virtual_embeddings))
  return {"prompt_embeddings": np.ascontiguousarray(table.astype(dtype))}


def save_adapter(cfg: ModelConfig, params, out_dir: pathlib.Path, base_model: str | None,
                 dtype=np.float32) -> pathlib.Path:
  """Write the adapters of ``cfg``/``params`` as a PEFT directory in ``out_dir``
  (which must exist and be empty; ``hf.staged_dir`` gives one)."""
  a = cfg.adapters
  if a is None:
    raise ValueError("this checkpoint has no adapters (it was trained with method 'full'); "
                     "export it without --peft")
  if a.bottleneck_size:
    raise ValueError("bottleneck adapters have no PEFT format (and no exact merged form); "
                     "keep the jaxsft checkpoint, or train LoRA/DoRA for an exportable adapter")
  prompt = a.prompt_tokens or a.prefix_tokens
  if prompt and a.lora_targets:
    raise ValueError("a PEFT directory holds one method; this checkpoint combines LoRA with "
                     "prompt/prefix tuning")
  if not (a.lora_targets or prompt):
    raise ValueError("this checkpoint's adapters have no PEFT export yet")
  if prompt and cfg.has_head:
    raise ValueError("PEFT's SEQ_CLS export covers LoRA/DoRA with a head; a prompt/prefix-tuned "
                     "head model has none yet (PEFT pools such rows differently): export it "
                     "without --peft")
  if prompt:
    tensors, config = prompt_tensors(cfg, params, dtype), prompt_config(cfg, base_model)
  else:
    tensors, config = lora_tensors(cfg, params, dtype), lora_config(cfg, base_model)
  if cfg.has_head:
    tensors.update(head_tensors(cfg, params, dtype))
    config = seq_cls_config(config)
    (out_dir / SEQ_CLS_FILE).write_text(
        json.dumps(seq_cls_kwargs(cfg), indent=2, sort_keys=True) + "\n")
  save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return out_dir


def to_plain_lora(out_dir: pathlib.Path, init_dir: pathlib.Path) -> None:
  """Rewrite the PiSSA/OLoRA adapter in ``out_dir`` (trained factors A, B over
  the residual base W − s·B₀A₀) as a plain LoRA over the original base W,
  from the same adapter as it started, ``init_dir`` (A₀, B₀): PEFT's
  conversion (``save_pretrained(path_initial_model_for_weight_conversion=)``,
  LLaMA-Factory's ``pissa_convert``). W − s·B₀A₀ + s·BA = W + s·[B | −B₀][A ; A₀]:
  rank 2r, and alpha doubled (×√2 under rsLoRA) so the scale s is the same.
  A task head saved beside the factors is kept as trained."""
  init_file = init_dir / ADAPTER_WEIGHTS
  if not init_file.is_file():
    raise ValueError(f"{init_file} is missing: the factors the stage started from are needed "
                     "to convert its adapter (export without --pissa-convert: the adapter "
                     "and its residual base)")
  tensors, init = load_file(str(out_dir / ADAPTER_WEIGHTS)), load_file(str(init_file))
  factors = {k for k in tensors if ".lora_A." in k or ".lora_B." in k}
  if factors != {k for k in init if ".lora_A." in k or ".lora_B." in k}:
    raise ValueError(f"{init_dir} holds other LoRA factors than the checkpoint (another "
                     "stage's?): it cannot convert this adapter")
  for k in factors:
    t0 = init[k].astype(tensors[k].dtype)
    tensors[k] = (np.concatenate([tensors[k], t0], axis=0) if ".lora_A." in k else
                  np.concatenate([tensors[k], -t0], axis=1))
  config = json.loads((out_dir / ADAPTER_CONFIG).read_text())
  config["r"] *= 2
  config["lora_alpha"] *= 2 ** 0.5 if config.get("use_rslora") else 2
  config["init_lora_weights"] = True
  save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- SEQ_CLS (task heads)

def head_tensors(cfg: ModelConfig, params, dtype=np.float32) -> dict[str, np.ndarray]:
  """The score head as PEFT saves a ``modules_to_save`` module of a
  *ForSequenceClassification: ``base_model.model.score.weight`` [C, D]."""
  kernel = _np(params["score"]["kernel_dc"])
  return {"base_model.model.score.weight": np.ascontiguousarray(kernel.T.astype(dtype))}


def seq_cls_config(config: dict[str, Any]) -> dict[str, Any]:
  """``config`` (a causal-LM adapter config) for PEFT's SEQ_CLS task, whose
  ``score`` module is saved whole beside the adapter."""
  return {**config, "task_type": "SEQ_CLS", "modules_to_save": ["score"]}


def seq_cls_kwargs(cfg: ModelConfig) -> dict[str, Any]:
  """What ``AutoModelForSequenceClassification.from_pretrained(base, **kwargs)``
  needs to build the head of ``cfg`` on a base that may be a causal LM (whose
  config has no labels and often no pad id, by which transformers pools)."""
  hf_config = hf.config_to_hf(cfg)  # checks the pad id, names unnamed labels
  return {k: hf_config[k] for k in ("num_labels", "problem_type", "id2label", "label2id",
                                    "pad_token_id")}
