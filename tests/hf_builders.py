"""Builders of tiny random transformers models and a tokenizer, for parity tests.

Every weight (norm scales and biases included) is randomized, so a wrong key,
transpose or missing bias shows up as a logits mismatch.
"""
from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB = 320

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning language models with JAX is fast and correct.",
    "用户：你好，请问今天的天气怎么样？",
    "def add(a, b):\n    return a + b\n",
    "Intent: {\"domain\": \"billing\", \"labels\": [\"refund\", \"invoice\"]}",
] * 20

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(vocab_size: int = VOCAB) -> transformers.PreTrainedTokenizerFast:
  """A byte-level BPE that prepends <s> like Llama's tokenizer, with a ChatML template."""
  specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  fast.chat_template = CHATML_TEMPLATE
  return fast


_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             tie_word_embeddings=False)

# variant -> (config class, overrides). "yi" is the Llama architecture as Yi ships it.
VARIANTS = {
    "llama": (transformers.LlamaConfig, {}),
    "llama_bias": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
    "llama3": (transformers.LlamaConfig, dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=32))),
    "llama_linear": (transformers.LlamaConfig, dict(
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "llama_dynamic": (transformers.LlamaConfig, dict(
        max_position_embeddings=16,
        rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "llama_yarn": (transformers.LlamaConfig, dict(
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=64))),
    "yi": (transformers.LlamaConfig, dict(num_key_value_heads=4, rope_parameters=dict(
        rope_type="default", rope_theta=5000000.0))),
    "mistral": (transformers.MistralConfig, dict(sliding_window=8, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2_untied": (transformers.Qwen2Config, {}),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2,
                                                  router_aux_loss_coef=0.02)),
}


def build_config(variant: str, **overrides) -> transformers.PretrainedConfig:
  cls, extra = VARIANTS[variant]
  kw = {**_BASE, **extra, **overrides}
  return cls(**kw)


def build_model(variant: str = "llama", seed: int = 0, **overrides):
  """A tiny random fp32 model in eval mode with every parameter randomized."""
  config = build_config(variant, **overrides)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(0.08 * torch.randn_like(p))
  return model.eval()
