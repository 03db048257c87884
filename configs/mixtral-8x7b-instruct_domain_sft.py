"""Mixtral-8x7B-Instruct + domain SFT with LoRA on attention and experts.

    python -m jaxsft.train --config configs/mixtral-8x7b-instruct_domain_sft.py \
        --config.model.source=/path/to/Mixtral-8x7B-Instruct-v0.1

46.7B parameters, 12.9B active per token (2 of 8 experts). LoRA (rank 16,
alpha 32) on q/k/v/o and on every expert's gate/up and down projections
(per-expert factors, PEFT's ``target_parameters`` layout): 0.22B trainable
parameters (0.48%; docs/MOE.md), so AdamW state is 1.8 GB instead of 375 GB
and one node of 8 x 80 GB holds it. The router is frozen (not a LoRA target);
the load-balancing loss (``router_aux_loss_coef`` from config.json, 0.02) stays
in the objective, its gradient reaching the router's inputs (the attention's
and earlier layers' factors).
``python -m jaxsft.export --peft`` writes an adapter that
``peft.PeftModel.from_pretrained`` loads onto the HF Mixtral; ``export.hf``
below writes the merged model. Full fine-tuning: ``--config.stages.sft.method=full``
(~16 bytes a parameter, 750 GB: 2 nodes or more).
"""
from __future__ import annotations

from jaxsft import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.output_dir = "runs/mixtral-8x7b-instruct_domain_sft"
  c.model.source = "mistralai/Mixtral-8x7B-Instruct-v0.1"
  # Frozen fp32 weights (187 GB, 23 GB a device over 8) and bf16 matmuls.
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  # Expert parallelism: the 8 experts of each layer over 8 devices (one
  # expert each, tokens exchanged within the group); the batch rows and every
  # other weight over all devices (fsdp x expert), the expert weights' D over
  # fsdp. Without it, FSDP would gather every expert's weights (2.8 GB in bf16
  # per layer) on every device, forward and backward.
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=8)
  c.stages.sft = config_lib.stage(
      objective="sft", method="lora",
      # PEFT's expert LoRA has no dropout (nor DoRA): dropout stays 0.
      peft=dict(targets=["q_proj", "k_proj", "v_proj", "o_proj", "expert_gate_up",
                         "expert_down"], rank=16, alpha=32.0, dropout=0.0),
      # LoRA takes ~10x the full-SFT rate (1e-5 for full fine-tuning of an MoE,
      # where a high lr collapses the router; the router is frozen here).
      lr=1e-4, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.03,
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
