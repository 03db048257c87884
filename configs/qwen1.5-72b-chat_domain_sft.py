"""Qwen1.5-72B-Chat + domain SFT (chat model + domain SFT, full fine-tuning).

    python -m jaxsft.train --config configs/qwen1.5-72b-chat_domain_sft.py \
        --config.model.source=/path/to/Qwen1.5-72B-Chat

Replace the data path with your own chat data (alpaca, sharegpt or messages
rows; ``jaxsft.data.pipeline`` documents the spec). For a 72B model the usual
choice is LoRA (~4 x 80 GB GPUs instead of ~32: the frozen base in bf16 is
145 GB); this recipe fine-tunes every weight. For LoRA:

    ... --config.stages.sft.method=lora --config.stages.sft.lr=1e-4 \
        --config.stages.sft.peft.rank=16

QLoRA on a single 80 GB GPU: the frozen projections held in 4 bits (NF4, as
LLaMA-Factory's quantization_bit=4). A step over one 4096-token row compiles to
49.2 GiB for an H100 (docs/BENCHMARKS.md); the 128-row batch is accumulated a
row at a time, and the host holds the original projections (~140 GB):

    ... --config.stages.sft.peft.quantization=nf4 --config.stages.sft.grad_accum=128
"""
from __future__ import annotations

from jaxsft import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.output_dir = "runs/qwen1.5-72b-chat_domain_sft"
  # A Hugging Face directory: the hub name as a placeholder, or a local copy.
  c.model.source = "Qwen/Qwen1.5-72B-Chat"
  # bf16 matmuls, fp32 master weights and Adam moments: ~16 bytes a parameter,
  # 1.15 TB for 72B before activations, so at least 2 nodes of 8 x 80 GB
  # (4 nodes for comfortable batches). model.param_dtype="bfloat16" (pure bf16)
  # halves that at some cost in precision of small updates.
  c.model.dtype = "bfloat16"
  # Recompute each layer in the backward pass: at 4096 tokens the saved
  # activations of 80 layers would not fit beside the sharded weights.
  c.model.remat = "full"
  # Fully sharded data parallel over every device (weights, gradients and
  # optimizer state split 1/N); tensor parallelism only pays inside a node.
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=1)
  c.stages.sft = config_lib.stage(
      objective="sft",
      # Chat models keep what they know at ~1e-5 (0.1x or less of the
      # pre-training lr); 2e-5 is the upper end for >30B models.
      lr=1e-5, schedule="cosine", min_lr_ratio=0.1,
      # A small warmup (1-3%); more when the lr is higher.
      warmup_ratio=0.01,
      # Stop by loss convergence: ~2 epochs for >=100k samples, 3-5 for small sets.
      epochs=2,
      # 128 x 4096 tokens (0.5M) per step, in 4 micro-batches of 32 rows: the
      # micro-batch divides evenly over 8, 16 or 32 devices.
      batch_size=128, grad_accum=4, seq_len=4096,
      # Qwen's own fine-tuning settings: beta2 0.95, weight decay 0.1, clip 1.0.
      weight_decay=0.1, b2=0.95, grad_clip=1.0,
      log_every=10, eval_every=200, eval_batches=16, checkpoint_every=200, keep_checkpoints=2,
      data=dict(
          datasets=[dict(path="data/your_domain_sft.jsonl",
                         system_prompt="You are a helpful assistant.")],
          # Qwen1.5-Chat's own ChatML template (with its default system prompt).
          template="tokenizer",
          eval_fraction=0.01))
  c.export.hf = True
  return c
