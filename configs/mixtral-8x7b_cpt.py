"""Mixtral-8x7B base + continued pre-training on a domain corpus (MoE, full).

    python -m jaxsft.train --config configs/mixtral-8x7b_cpt.py \
        --config.model.source=/path/to/Mixtral-8x7B-v0.1

Continued pre-training (every token trained) of the base MoE model, the step
that lets Mixtral match much larger dense models on a domain. The corpus is
mixed with general text (replay) so that general ability is not erased.

The router keeps learning, held balanced by the load-balancing loss: it is
always added here (unlike transformers, whose ``output_router_logits`` defaults
to False so a plain Trainer silently drops it), weighted by the model's
``router_aux_loss_coef`` (0.02 in Mixtral's config.json; override with
``--config.model.router_aux_loss_coef``). metrics.jsonl logs the per-layer
``expert_fraction_min/max``: with 8 experts both stay near 0.125 when routing
is balanced; a min near 0 means an expert is dying. docs/MOE.md shows both.
"""
from __future__ import annotations

from jaxsft import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.output_dir = "runs/mixtral-8x7b_cpt"
  c.model.source = "mistralai/Mixtral-8x7B-v0.1"
  # 46.7B parameters at ~16 bytes each (fp32 master weights, gradients, Adam):
  # ~750 GB, so 16 x 80 GB (2 nodes) at least; bf16 compute, full remat.
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  # "auto": dropless (sorted tokens, grouped matmuls) on TPU; bucketed on GPU
  # (per-expert buckets of 2x an even share, bigger ones for a layer that
  # overflows: watch moe_bucket_overflow in metrics.jsonl) until XLA has a
  # grouped-GEMM ragged_dot there (docs/MOE.md).
  c.model.moe_dispatch = "auto"
  c.model.moe_capacity_factor = 2.0
  # The ST-MoE z-loss keeps router logits small in long bf16 runs; off by
  # default as in Mixtral's own training recipe. 1e-3 is the paper's value.
  c.model.router_z_loss_coef = 0.0
  # Expert parallelism: the 8 experts of each layer over 8 devices (one expert
  # each, tokens exchanged within the group); the batch rows and every other
  # weight over all devices (fsdp x expert), the expert weights' D over fsdp.
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=8)
  c.stages.cpt = config_lib.stage(
      objective="lm",
      # CPT of a converged base model: ~0.1x a pre-training peak, with a short
      # warmup; MoE routers are touchy, so no higher than this.
      lr=2e-5, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.01,
      # One pass over the corpus is usual; repeat only a small corpus.
      epochs=1,
      # 512 x 4096 tokens (2M) per step, as large models are pre-trained.
      batch_size=512, grad_accum=16, seq_len=4096,
      weight_decay=0.1, b2=0.95, grad_clip=1.0,
      log_every=10, eval_every=500, eval_batches=16, checkpoint_every=500, keep_checkpoints=2,
      data=dict(
          # Domain text 3 : 1 general text (replay against forgetting); rows
          # are {"text": ...}.
          datasets=[dict(path="data/your_domain_corpus.jsonl", format="text", weight=3.0),
                    dict(path="data/general_corpus.jsonl", format="text", weight=1.0)],
          eval_fraction=0.005))
  c.export.hf = True
  return c
