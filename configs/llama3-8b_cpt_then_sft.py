"""Llama-3-8B base + continued pre-training + domain SFT (mode 2).

    python -m jaxsft.train --config configs/llama3-8b_cpt_then_sft.py \
        --config.model.source=/path/to/Meta-Llama-3-8B

Stage ``cpt`` teaches the base model the domain's text (every token trained);
stage ``sft`` starts from its weights and teaches the answer format (answer
tokens only). Replace the data paths with your corpus (``{"text": ...}`` rows)
and your instruction data.
"""
from __future__ import annotations

from jaxsft import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.output_dir = "runs/llama3-8b_cpt_then_sft"
  c.model.source = "meta-llama/Meta-Llama-3-8B"
  # 8B with fp32 master weights and Adam: ~130 GB, one node of 8 x 80 GB.
  c.model.dtype = "bfloat16"
  # Save the attention outputs, recompute the rest: most of full remat's
  # memory saving at a smaller recompute cost for an 8B model.
  c.model.remat = "save_attention_out"
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=1)  # FSDP over the node's 8 GPUs
  c.stages.cpt = config_lib.stage(
      objective="lm",
      # About 0.1x Llama 3's pre-training peak (3e-4): high enough to learn
      # the domain, low enough not to erase general knowledge.
      lr=3e-5, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.01,
      # One pass over the corpus is usual for CPT; repeat only a small corpus.
      epochs=1,
      # 256 x 4096 tokens (1M) per step, as in pre-training.
      batch_size=256, grad_accum=8, seq_len=4096,
      weight_decay=0.1, b2=0.95, grad_clip=1.0,
      log_every=10, eval_every=500, eval_batches=16, checkpoint_every=500, keep_checkpoints=2,
      data=dict(
          datasets=[dict(path="data/your_domain_corpus.jsonl", format="text")],
          eval_fraction=0.005))
  c.stages.sft = config_lib.stage(
      objective="sft",
      # SFT at ~0.1x the pre-training lr; 1e-5..2e-5 for 7-8B models.
      lr=1e-5, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.03,
      # ~2 epochs for >=100k samples, 3-5 for small sets; watch the eval loss.
      epochs=3,
      batch_size=64, grad_accum=2, seq_len=4096,
      weight_decay=0.0, b2=0.95, grad_clip=1.0,
      log_every=10, eval_every=200, eval_batches=16, checkpoint_every=200, keep_checkpoints=2,
      data=dict(
          datasets=[dict(path="data/your_domain_sft.jsonl")],
          # The base tokenizer has no chat template; Llama 3's published one has
          # its header tokens in the base vocabulary (untrained there, which is
          # why they need full fine-tuning or trainable embeddings).
          template="llama3",
          eval_fraction=0.01))
  c.export.hf = True
  return c
