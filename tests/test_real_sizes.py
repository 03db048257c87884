"""Full-size models, checked by shape only: nothing is materialized.

The ``config.json`` of each published checkpoint is written out below. For
each, jaxsft's parameter count (``jax.eval_shape`` of the initializer) must
equal transformers' for the same config (built on torch's meta device, the
reference), and both must be within 0.5% of the size the model is published
as. The benchmark's ``SHAPES`` must be the same architectures.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxsft import bench, hf
from jaxsft.models import llama

QWEN15_72B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 8192,
    "initializer_range": 0.02,
    "intermediate_size": 24576,
    "max_position_embeddings": 32768,
    "max_window_layers": 70,
    "model_type": "qwen2",
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 64,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

# The chat model differs only in its end-of-turn token (<|im_end|>).
QWEN15_72B_CHAT = {**QWEN15_72B, "eos_token_id": 151645}

YI_34B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 20480,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 56,
    "num_hidden_layers": 60,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 5000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0",
    "use_cache": True,
    "vocab_size": 64000,
}

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

# Two more benchmark shapes: tied embeddings and llama3 RoPE scaling (1B), and
# Qwen2's grouped kv heads with qkv bias (7B).
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

# checkpoint -> (config.json, size it is published as, bench shape).
MODELS = {
    "Qwen/Qwen1.5-72B": (QWEN15_72B, 72.3e9, "qwen1.5-72b"),
    "Qwen/Qwen1.5-72B-Chat": (QWEN15_72B_CHAT, 72.3e9, "qwen1.5-72b"),
    "01-ai/Yi-34B": (YI_34B, 34.4e9, "yi-34b"),
    "mistralai/Mixtral-8x7B-v0.1": (MIXTRAL_8X7B, 46.7e9, "mixtral-8x7b"),
    "meta-llama/Meta-Llama-3-8B": (LLAMA3_8B, 8.03e9, "llama3-8b"),
    "meta-llama/Llama-3.2-1B": (LLAMA32_1B, 1.24e9, "llama3.2-1b"),
    "Qwen/Qwen2-7B": (QWEN2_7B, 7.62e9, "qwen2-7b"),
}


def _jaxsft_count(config: dict) -> int:
  params = llama.abstract_params(hf.config_from_hf(config))
  return bench.param_count(params)


def _transformers_count(config: dict) -> int:
  hf_config = transformers.AutoConfig.for_model(**config)
  # The meta device gives every tensor a shape and no storage.
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count_matches_transformers_and_published(name):
  config, published, _ = MODELS[name]
  ours = _jaxsft_count(config)
  assert ours == _transformers_count(config)
  assert abs(ours - published) / published < 0.005, f"{ours:,} vs published {published:,.0f}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bench_shape_is_the_published_architecture(name):
  config, _, shape = MODELS[name]
  # Token ids are not architecture; the bench shapes leave them unset.
  expected = dataclasses.replace(hf.config_from_hf(config), bos_token_id=None,
                                 eos_token_ids=(), pad_token_id=None)
  assert bench.SHAPES[shape] == expected


def test_abstract_params_allocate_nothing():
  """The 72B tree is shapes only; a real init would need 289 GB in fp32."""
  params = llama.abstract_params(hf.config_from_hf(QWEN15_72B, param_dtype="bfloat16"))
  leaves = jax.tree_util.tree_leaves(params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert {str(x.dtype) for x in leaves} == {"bfloat16"}
  q = params["layers"]["attn"]["q_dnh"]
  assert q.shape == (80, 8192, 64, 128)
  assert sum(int(np.prod(x.shape)) * 2 for x in leaves) / 1e9 == pytest.approx(144.6, abs=0.1)
