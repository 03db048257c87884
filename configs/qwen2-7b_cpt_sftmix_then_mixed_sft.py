"""Qwen2-7B base + CPT with SFT data mixed in + mixed general/domain SFT (mode 5).

    python -m jaxsft.train --config configs/qwen2-7b_cpt_sftmix_then_mixed_sft.py \
        --config.model.source=/path/to/Qwen2-7B

Stage ``cpt`` trains on the domain corpus with some instruction data mixed in
(each keeps its own loss: text on every token, chats on their answers), so the
model learns the domain's knowledge and already sees it asked about. Stage
``sft`` mixes general and domain tasks with per-task ratios and per-task
system prompts: the general data keeps the model's broad skills, and each
system prompt tells the model which task and answer style is wanted. Replace
the data paths with your own files.
"""
from __future__ import annotations

from jaxsft import config as config_lib

GENERAL = "You are a helpful assistant."
DOMAIN = "You are the support assistant of ACME. Answer from ACME's documentation."
INTENT = ('Classify the customer message. Answer with JSON only: '
          '{"domain": ..., "intents": [...]}.')


def get_config():
  c = config_lib.base_config()
  c.output_dir = "runs/qwen2-7b_cpt_sftmix_then_mixed_sft"
  c.model.source = "Qwen/Qwen2-7B"
  c.model.dtype = "bfloat16"
  c.model.remat = "save_attention_out"  # 7B on one node; see llama3-8b_cpt_then_sft.py
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=1)
  c.stages.cpt = config_lib.stage(
      objective="lm",
      # ~0.1x the original pre-training peak lr.
      lr=3e-5, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.01,
      epochs=1, batch_size=256, grad_accum=8, seq_len=4096,
      weight_decay=0.1, b2=0.95, grad_clip=1.0,
      log_every=10, eval_every=500, eval_batches=16, checkpoint_every=500, keep_checkpoints=2,
      data=dict(
          # Corpus : instructions = 4:1 by examples (weights are sampling ratios).
          datasets=[dict(path="data/your_domain_corpus.jsonl", format="text", weight=4.0),
                    dict(path="data/your_domain_sft.jsonl", system_prompt=DOMAIN, weight=1.0)],
          template="qwen2",  # ChatML with Qwen's default system prompt
          eval_fraction=0.005))
  c.stages.sft = config_lib.stage(
      objective="sft",
      lr=1e-5, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.03,
      epochs=2, batch_size=64, grad_accum=2, seq_len=4096,
      weight_decay=0.0, b2=0.95, grad_clip=1.0,
      log_every=10, eval_every=200, eval_batches=16, checkpoint_every=200, keep_checkpoints=2,
      data=dict(
          # Per-task ratios (general : domain Q&A : intent JSON = 1:2:1) and a
          # system prompt per task.
          datasets=[dict(path="data/your_general_sft.jsonl", system_prompt=GENERAL, weight=1.0),
                    dict(path="data/your_domain_sft.jsonl", system_prompt=DOMAIN, weight=2.0),
                    dict(path="data/your_intent_sft.jsonl", system_prompt=INTENT, weight=1.0)],
          template="qwen2",
          eval_fraction=0.01))
  c.export.hf = True
  return c
