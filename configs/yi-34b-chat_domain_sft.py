"""Yi-34B-Chat + domain SFT (chat model + domain SFT, full fine-tuning).

    python -m jaxsft.train --config configs/yi-34b-chat_domain_sft.py \
        --config.model.source=/path/to/Yi-34B-Chat

Yi is the Llama architecture (its config says ``llama``) with a 64k vocabulary
and ChatML chat template. Replace the data path with your own chat data. This
recipe fine-tunes every weight; LoRA is the cheaper choice (~2 x 80 GB GPUs
instead of 16: the frozen 34B base in bf16, 68 GB, plus small adapters):

    ... --config.stages.sft.method=lora --config.stages.sft.lr=1e-4 \
        --config.stages.sft.peft.rank=16
"""
from __future__ import annotations

from jaxsft import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.output_dir = "runs/yi-34b-chat_domain_sft"
  c.model.source = "01-ai/Yi-34B-Chat"
  # bf16 compute, fp32 master weights: ~16 bytes a parameter, 550 GB for 34B,
  # so 16 x 80 GB (2 nodes) for full fine-tuning with room for activations.
  c.model.dtype = "bfloat16"
  c.model.remat = "full"  # 60 layers at 4096 tokens: recompute rather than store
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=1)  # FSDP over every device
  c.stages.sft = config_lib.stage(
      objective="sft",
      # ~1e-5 for a 34B chat model (0.1x or less of its pre-training lr).
      lr=1e-5, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.03,
      # ~2 epochs for >=100k samples; 3-5 for a few thousand.
      epochs=3,
      batch_size=64, grad_accum=2, seq_len=4096,
      weight_decay=0.0, b2=0.95, grad_clip=1.0,
      log_every=10, eval_every=200, eval_batches=16, checkpoint_every=200, keep_checkpoints=2,
      data=dict(
          datasets=[dict(path="data/your_domain_sft.jsonl")],
          template="tokenizer",  # Yi-Chat's ChatML template
          eval_fraction=0.01))
  c.export.hf = True
  return c
