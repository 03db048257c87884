"""Qwen2-7B-Instruct + domain SFT (mode 6: chat model + domain SFT).

    python -m jaxsft.train --config configs/qwen2-7b-instruct_domain_sft.py \
        --config.model.source=/path/to/Qwen2-7B-Instruct

The chat model already follows instructions; domain SFT adds the domain's
knowledge and answer style. A share of general chat data keeps it from
forgetting how to do everything else. Replace the data paths with your own.
"""
from __future__ import annotations

from jaxsft import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.output_dir = "runs/qwen2-7b-instruct_domain_sft"
  c.model.source = "Qwen/Qwen2-7B-Instruct"
  # ~16 bytes a parameter (bf16 compute, fp32 master weights and Adam): 120 GB
  # for 7.6B, one node of 8 x 80 GB.
  c.model.dtype = "bfloat16"
  c.model.remat = "save_attention_out"
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=1)
  c.stages.sft = config_lib.stage(
      objective="sft",
      # A chat model is easily knocked off its alignment: 1e-5 (~0.1x of its
      # pre-training lr), a short warmup, cosine to 10%.
      lr=1e-5, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.03,
      # ~2 epochs for >=100k samples, 3-5 for small sets.
      epochs=3,
      batch_size=64, grad_accum=2, seq_len=4096,
      weight_decay=0.0, b2=0.95, grad_clip=1.0,
      log_every=10, eval_every=200, eval_batches=16, checkpoint_every=200, keep_checkpoints=2,
      data=dict(
          # Domain : general = 4:1.
          datasets=[dict(path="data/your_domain_sft.jsonl", weight=4.0,
                         system_prompt="You are the support assistant of ACME."),
                    dict(path="data/your_general_sft.jsonl", weight=1.0)],
          template="tokenizer",  # Qwen2-Instruct's own ChatML template
          eval_fraction=0.01))
  c.export.hf = True
  return c
