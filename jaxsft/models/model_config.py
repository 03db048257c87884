"""The architecture of one decoder model, plus the numeric policy it runs under.

Everything the forward pass needs is here; nothing here depends on Hugging Face
(``jaxsft.hf`` converts ``config.json`` to and from this). Fields are plain
Python values so the config is hashable and can be a static jit argument.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

# Model families this codebase implements; ``model_type`` values of HF configs
# map onto these in ``jaxsft.hf`` (Yi checkpoints say "llama").
FAMILIES = ("llama", "mistral", "qwen2", "mixtral")

# Remat policies for the scanned decoder layer, by name (see models/llama.py).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out",
                  "projections_attention")

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# q/k/v and gate/up each as one matmul (llama.fuses_projections): auto = on a
# GPU without tensor parallelism.
FUSED_PROJECTIONS = ("auto", "on", "off")

# Weights LoRA can target, by the Hugging Face module name users know them by;
# on an MoE model the experts' fused weights (transformers' ``experts.gate_up_proj``
# and ``experts.down_proj``, PEFT's ``target_parameters``) are ``expert_gate_up``
# and ``expert_down``: per-expert factors (jaxsft/peft/lora.py).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "lm_head", "embed_tokens", "expert_gate_up", "expert_down")
# PEFT's "all-linear": every linear layer of the decoder, not the output layer
# (nor MoE experts, which are not linear modules in transformers: as in PEFT).
ALL_LINEAR = LORA_TARGETS[:7]
EXPERT_TARGETS = ("expert_gate_up", "expert_down")
# LoRA factor inits (PEFT's init_lora_weights); the principal ones take both
# factors from the weight and leave the residual as the base.
PRINCIPAL_INITS = ("pissa", "olora")
LORA_INITS = ("kaiming", "gaussian") + PRINCIPAL_INITS
PROMPT_ENCODERS = ("none", "mlp", "lstm")


@dataclasses.dataclass(frozen=True)
class Adapters:
  """Parameter-efficient additions to the base model (see ``jaxsft/peft``).

  Several may be combined; all default to off. LoRA adds ``scale·B(A(x))`` to
  each targeted projection (scale = alpha/rank, or alpha/√rank with rsLoRA);
  DoRA further rescales each output row by a learned magnitude over the norm
  of the updated weight. Bottleneck adapters add ``up(act(down(h)))`` to the
  output of attention and of the MLP. Prompt tuning prepends learned virtual
  token embeddings to every example (P-tuning produces them with an encoder);
  prefix tuning gives every layer learned key/value prefixes.
  """
  lora_targets: tuple[str, ...] = ()
  lora_rank: int = 0
  lora_alpha: float = 0.0
  rslora: bool = False
  dora: bool = False
  lora_dropout: float = 0.0
  # The factors' init, as PEFT's init_lora_weights: "kaiming" (A uniform, PEFT's
  # True) or "gaussian" (A normal(1/r)), B zero; or "pissa"/"olora" (both from
  # the weight's SVD / QR, the base left as the residual: peft/lora.py).
  lora_init: str = "kaiming"
  bottleneck_size: int = 0
  prompt_tokens: int = 0
  prompt_encoder: str = "none"  # P-tuning: "mlp" or "lstm"
  prompt_encoder_hidden: int = 0
  prefix_tokens: int = 0
  prefix_projection_hidden: int = 0  # 0: prefixes are learned directly
  frozen_layers: int = 0  # freeze tuning: the first F layers in their own stack

  def __post_init__(self):
    problems = []
    unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
    if unknown:
      problems.append(f"LoRA targets {unknown} are not among {LORA_TARGETS}")
    if self.lora_targets and self.lora_rank <= 0:
      problems.append(f"lora_rank={self.lora_rank} must be positive")
    if self.dora and not self.lora_targets:
      problems.append("dora needs lora_targets")
    if self.dora and {"lm_head", "embed_tokens"} & set(self.lora_targets):
      problems.append("DoRA applies to the decoder's linear projections, not to lm_head or "
                      "embed_tokens; target those with plain LoRA in another stage")
    if not 0 <= self.lora_dropout < 1:
      problems.append(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
    experts = [t for t in self.lora_targets if t in EXPERT_TARGETS]
    if experts and (self.dora or self.lora_dropout):
      problems.append(f"LoRA on {experts} supports neither DoRA nor dropout (PEFT's expert LoRA "
                      "has neither, so they could not be exported); use plain LoRA with "
                      "dropout 0, or leave the experts out of the targets")
    if self.lora_init not in LORA_INITS:
      problems.append(f"lora_init={self.lora_init!r} is not one of {LORA_INITS}")
    if self.lora_init in PRINCIPAL_INITS:
      other = [t for t in self.lora_targets if t not in ALL_LINEAR]
      if other or self.dora:
        problems.append(f"lora_init={self.lora_init!r} applies to the decoder's linear "
                        f"projections {ALL_LINEAR} with plain LoRA, not to "
                        f"{other or 'DoRA'}")
    if self.prompt_encoder not in PROMPT_ENCODERS:
      problems.append(f"prompt_encoder={self.prompt_encoder!r} is not one of {PROMPT_ENCODERS}")
    if self.prompt_tokens and self.prefix_tokens:
      problems.append("prompt tuning and prefix tuning cannot be combined in one model")
    if self.prompt_encoder != "none" and not self.prompt_tokens:
      problems.append("a prompt encoder needs prompt_tokens > 0")
    for name in ("bottleneck_size", "prompt_tokens", "prompt_encoder_hidden", "prefix_tokens",
                 "prefix_projection_hidden", "frozen_layers"):
      if getattr(self, name) < 0:
        problems.append(f"{name}={getattr(self, name)} must be >= 0")
    if problems:
      raise ValueError("invalid adapters: " + "; ".join(problems))

  @property
  def lora_scale(self) -> float:
    if not self.lora_targets:
      return 0.0
    return self.lora_alpha / (self.lora_rank ** 0.5 if self.rslora else self.lora_rank)

  @property
  def virtual_tokens(self) -> int:
    """Slots each example reserves at its start for prompt-tuning embeddings."""
    return self.prompt_tokens
# How an MoE layer sends tokens to experts (see models/mixtral.py): "dense"
# runs every expert on every token, "bucketed" fills fixed-size per-expert
# buckets (bigger ones for a call where one overflows), "dropless" sorts
# tokens by expert and runs grouped matmuls (ragged_dot), "grouped" sorts
# them and runs each expert on its rows tile by tile, "auto" picks by backend.
MOE_DISPATCHES = ("auto", "dense", "bucketed", "dropless", "grouped")
# Task heads (models/heads.py), named as transformers' ``problem_type``:
# softmax over labels, independent sigmoids per label, or one scalar (a reward).
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
# scan_unroll 0 (auto) unrolls a model's layers without remat up to this depth.
# Compile time grows with the unrolled depth (Llama-3-8B's 32 layers, LoRA,
# compiled for an H200 on a 2-core host: 41 s unrolled, 4.6 s rolled with
# jax 0.10.2; 118 s and 16 s with jax 0.11.2, for a ~9% shorter step); deeper
# models (Yi-34B 60, Qwen1.5-72B 80) keep the rolled scan, and train with a
# remat policy anyway.
AUTO_UNROLL_MAX_LAYERS = 32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numeric policy of a decoder-only transformer.

  Axis letters used in parameter names: V vocab, D model width, N query heads,
  K key/value heads, H head dim, F feed-forward width, E experts, L layers,
  C labels of a task head.
  """

  family: str
  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # Normalized RoPE scaling: a tuple of (key, value) pairs so the config stays
  # hashable; "rope_type" is one of ROPE_TYPES. Empty means default RoPE.
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen1.5/Qwen2; Llama's attention_bias sets qkv and o
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None  # Mistral: keys within this many positions
  hidden_act: str = "silu"
  initializer_range: float = 0.02
  # Mixture of experts (Mixtral); num_experts == 0 means a dense MLP.
  num_experts: int = 0
  num_experts_per_tok: int = 2
  router_aux_loss_coef: float = 0.02  # load-balancing loss, always added in training
  router_z_loss_coef: float = 0.0  # ST-MoE router z-loss (0 = off)
  # Special tokens, carried for generation and export.
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # Task head (models/heads.py): num_labels == 0 is a causal LM (lm_head);
  # otherwise a ``score`` head [D, num_labels] replaces the lm_head, as in
  # transformers' *ForSequenceClassification. ``label_names`` are the class
  # names by id (empty for a reward model); ``problem_type`` one of PROBLEM_TYPES.
  num_labels: int = 0
  label_names: tuple[str, ...] = ()
  problem_type: str = ""
  # Numeric and execution policy (not architecture).
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of matmuls and activations
  remat: str = "none"
  # Layers per iteration of the layer scan (1: a loop over layers; num_layers:
  # fully unrolled, as XLA's cost analysis needs to count every layer; 0:
  # auto, ``layer_unroll``).
  scan_unroll: int = 0
  # Time steps per vocab chunk of the training loss (losses.masked_cross_entropy;
  # 0: losses.DEFAULT_CHUNK_SIZE). Bigger chunks hold more logits at once and
  # accumulate the output layer's gradient fewer times.
  loss_chunk: int = 0
  attention: str = "auto"  # "auto": cuDNN fused attention on GPU, XLA elsewhere
  fused_projections: str = "auto"  # one of FUSED_PROJECTIONS
  # NEFTune: uniform noise added to the input embeddings in training steps
  # (llama.neftune_noise; 0 = off). Set per stage by the trainer on the train
  # step's config only, so no saved or exported config carries it.
  neftune_noise_alpha: float = 0.0
  # Parameter-efficient additions (LoRA, DoRA, adapters, prompts); None: none.
  adapters: Adapters | None = None
  moe_dispatch: str = "auto"  # one of MOE_DISPATCHES
  # Bucketed dispatch: rows per expert bucket as a multiple of an even share
  # of the N·k assignments (models/mixtral.py bucket_capacity).
  moe_capacity_factor: float = 2.0

  def __post_init__(self):
    problems = []
    if self.family not in FAMILIES:
      problems.append(f"family={self.family!r} is not one of {FAMILIES}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim"):
      if getattr(self, name) <= 0:
        problems.append(f"{name}={getattr(self, name)} must be positive")
    if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
      problems.append(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.scan_unroll < 0:
      problems.append(f"scan_unroll={self.scan_unroll} must be >= 0 (0: auto)")
    if self.loss_chunk < 0:
      problems.append(f"loss_chunk={self.loss_chunk} must be >= 0 (0: the default)")
    if not self.neftune_noise_alpha >= 0:
      problems.append(f"neftune_noise_alpha={self.neftune_noise_alpha} must be >= 0 (0: off)")
    if self.remat not in REMAT_POLICIES:
      problems.append(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
    if self.attention not in ATTENTION_IMPLS:
      problems.append(f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
    if self.fused_projections not in FUSED_PROJECTIONS:
      problems.append(f"fused_projections={self.fused_projections!r} is not one of "
                      f"{FUSED_PROJECTIONS}")
    rope_type = self.rope_dict().get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
      problems.append(f"rope_scaling type {rope_type!r} is not one of {ROPE_TYPES}")
    if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
      problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                      f"[1, num_experts={self.num_experts}]")
    if self.moe_dispatch not in MOE_DISPATCHES:
      problems.append(f"moe_dispatch={self.moe_dispatch!r} is not one of {MOE_DISPATCHES}")
    if not self.moe_capacity_factor > 0:
      problems.append(f"moe_capacity_factor={self.moe_capacity_factor} must be > 0 "
                      "(2.0: buckets twice an even share of the routed tokens)")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
      if getattr(self, name) < 0:
        problems.append(f"{name}={getattr(self, name)} must be >= 0")
    if self.sliding_window is not None and self.sliding_window <= 0:
      problems.append(f"sliding_window={self.sliding_window} must be positive or None")
    if self.num_labels < 0:
      problems.append(f"num_labels={self.num_labels} must be >= 0 (0: a causal LM)")
    if self.num_labels and self.problem_type not in PROBLEM_TYPES:
      problems.append(f"problem_type={self.problem_type!r} is not one of {PROBLEM_TYPES} "
                      f"(needed with num_labels={self.num_labels})")
    if not self.num_labels and (self.problem_type or self.label_names):
      problems.append("problem_type and label_names need num_labels > 0")
    if self.label_names and len(self.label_names) != self.num_labels:
      problems.append(f"label_names has {len(self.label_names)} names for "
                      f"num_labels={self.num_labels}")
    if self.problem_type == "regression" and self.num_labels != 1:
      problems.append(f"problem_type regression (a reward model) needs num_labels=1, got "
                      f"{self.num_labels}")
    a = self.adapters
    if a is not None and a.frozen_layers >= self.num_layers:
      problems.append(f"adapters.frozen_layers={a.frozen_layers} must be below "
                      f"num_layers={self.num_layers}")
    if problems:
      raise ValueError("invalid model config: " + "; ".join(problems))

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def layer_unroll(self) -> int:
    """Layers per iteration of the layer scan as run: ``scan_unroll``, or for
    0 (auto) every layer when ``remat`` is "none" and the model has at most
    AUTO_UNROLL_MAX_LAYERS, else 1 (a rolled loop). ``remat`` "none" spends
    memory for speed, and unrolled layers are faster: the rolled scan
    zero-fills, writes and reads back stacked [L,B,T,...] residuals
    (Llama-3.2-1B full SFT, compiled for an H200: 8% less time by the static
    roofline, 3% more memory; tiny on CPU: ~4-10% more tokens/s,
    docs/BENCHMARKS.md). A remat policy is chosen to save memory, and a
    rolled scan runs it in the least."""
    if self.scan_unroll:
      return self.scan_unroll
    if self.remat == "none" and self.num_layers <= AUTO_UNROLL_MAX_LAYERS:
      return self.num_layers
    return 1

  @property
  def has_head(self) -> bool:
    """Whether this is a sequence classification / reward model (no lm_head)."""
    return self.num_labels > 0

  def rope_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = self.rope_dict()
    d["eos_token_ids"] = list(self.eos_token_ids)
    if self.adapters is not None:
      d["adapters"]["lora_targets"] = list(self.adapters.lora_targets)
    d["label_names"] = list(self.label_names)
    return json.dumps(d, indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    d = json.loads(text)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
    d["rope_scaling"] = tuple(sorted(d.get("rope_scaling", {}).items()))
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
    if d.get("adapters") is not None:
      a = dict(d["adapters"])
      a["lora_targets"] = tuple(a.get("lora_targets", ()))
      d["adapters"] = Adapters(**a)
    d["label_names"] = tuple(d.get("label_names", ()))
    return cls(**d)
