"""Mixtral-8x7B-Instruct + domain SFT (MoE chat model, full fine-tuning).

    python -m jaxsft.train --config configs/mixtral-8x7b-instruct_domain_sft.py \
        --config.model.source=/path/to/Mixtral-8x7B-Instruct-v0.1

46.7B parameters, 12.9B active per token (2 of 8 experts). The router is
trained with its load-balancing loss (``router_aux_loss_coef`` from the
model's config.json, 0.02). The usual cheaper route is LoRA on the attention
and expert projections (the PEFT issue); this recipe fine-tunes every weight.
"""
from __future__ import annotations

from jaxsft import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.output_dir = "runs/mixtral-8x7b-instruct_domain_sft"
  c.model.source = "mistralai/Mixtral-8x7B-Instruct-v0.1"
  # ~16 bytes a parameter with fp32 master weights and Adam: 750 GB, so
  # 16 x 80 GB (2 nodes) or more.
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  # Expert parallelism: the 8 experts of each layer over 8 devices (one
  # expert each, tokens exchanged within the group); the batch rows and every
  # other weight over all devices (fsdp x expert), the expert weights' D over
  # fsdp. Without it, FSDP would gather every expert's weights (2.8 GB in bf16
  # per layer) on every device, forward and backward.
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=8)
  c.stages.sft = config_lib.stage(
      objective="sft",
      # MoE fine-tuning is touchy (router collapse at high lr): 1e-5 or less.
      lr=1e-5, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.03,
      epochs=2,
      batch_size=64, grad_accum=4, seq_len=4096,
      weight_decay=0.0, b2=0.95, grad_clip=1.0,
      log_every=10, eval_every=200, eval_batches=16, checkpoint_every=200, keep_checkpoints=2,
      data=dict(
          datasets=[dict(path="data/your_domain_sft.jsonl")],
          # [INST] ... [/INST]answer</s>; it has no system role, so a system
          # prompt is merged into the first user message.
          template="mistral",
          eval_fraction=0.01))
  c.export.hf = True
  return c
