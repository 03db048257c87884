"""The PyTorch peer of ``python -m jaxsft.bench --peer hf``: the same model,
tokens and method trained the way a Hugging Face user would.

    python tools/hf_peer.py --hf-config DIR/config.json --data DIR/batches.npz \
        [--method full|lora|dora] [--dtype bfloat16|float32] [--warmup 3] [--remat] \
        [--compile] [--device cuda|cpu]

``jaxsft.bench`` writes both inputs and runs this as a subprocess before JAX
touches the device, so the two never hold device memory at the same time.

What a step is (what the issue's reference numbers used):
  * ``AutoModelForCausalLM.from_config`` (Llama / Qwen2 / Mistral / Mixtral),
    random init on the device, fp32 master weights, ``attn_implementation="sdpa"``;
  * forward under ``torch.autocast(bfloat16)`` (``--dtype float32``: no
    autocast), HF's own shifted cross-entropy with ``labels`` = -100 on masked
    and padded tokens, backward, ``clip_grad_norm_(1.0)`` (the HF Trainer's
    default, and jaxsft's ``grad_clip``), AdamW (``fused=True`` on CUDA,
    the default foreach implementation on CPU), ``zero_grad(set_to_none=True)``;
  * ``--method lora|dora``: ``peft.LoraConfig(r=16, lora_alpha=32,
    target_modules="all-linear", lora_dropout=0.0, use_dora=...)``, the base
    weights frozen in fp32;
  * ``--remat``: ``gradient_checkpointing_enable(use_reentrant=False)``;
  * ``--compile``: ``torch.compile(model)`` (its compile time lands in the
    warmup steps; the first step's time is reported as ``compile_s``).

Data (``--data``, an ``.npz``), one of two layouts:
  * rows: ``tokens`` and ``loss_mask`` [steps, B, T], one batch per step, no
    padding (no attention mask passed, so SDPA runs its causal kernel);
  * examples: ``ex_tokens`` / ``ex_loss_mask`` (all examples end to end),
    ``ex_lengths`` and ``batch``: consecutive examples form batches of
    ``batch``, each padded to its longest example with an attention mask, as
    ``DataCollatorWithPadding`` does. Every batch is run once.
The first ``--warmup`` steps are not timed. Prints, last, one JSON line:
``tokens_per_s`` (padded tokens, i.e. everything the model ran over),
``nonpad_tokens_per_s``, ``step_s`` (median), ``peak_mem_gib`` and the loss.
Rates over rows use the median step time; over padded batches (whose shapes
differ) all timed tokens over all timed time.

torch, transformers and peft are imported here only: jaxsft never needs them.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch
import transformers


def build_model(hf_config: dict, method: str, device: str, remat: bool):
  """A randomly initialized fp32 model on ``device`` (built there: initializing
  an 8B model on the host would take minutes)."""
  config = transformers.AutoConfig.for_model(**hf_config)
  config.use_cache = False
  with torch.device(device):
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="sdpa", dtype=torch.float32)
  if remat:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  if method in ("lora", "dora"):
    import peft  # noqa: PLC0415  (only the LoRA rows need it)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                           use_dora=method == "dora", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
  elif method != "full":
    raise SystemExit(f"error: the peer runs --method full, lora or dora, not {method!r}")
  model.train()
  return model


def batches(data: np.lib.npyio.NpzFile):
  """Yields (input_ids, attention_mask or None, labels, nonpad token count), numpy."""
  if "tokens" in data:
    for tokens, mask in zip(data["tokens"], data["loss_mask"]):
      labels = np.where(mask != 0, tokens, -100)
      yield tokens, None, labels, tokens.size
    return
  lengths, b = data["ex_lengths"], int(data["batch"])
  starts = np.concatenate([[0], np.cumsum(lengths)])
  for first in range(0, len(lengths), b):
    idx = range(first, min(first + b, len(lengths)))
    width = int(max(lengths[i] for i in idx))
    tokens = np.zeros((len(idx), width), np.int64)
    attn = np.zeros((len(idx), width), np.int64)
    labels = np.full((len(idx), width), -100, np.int64)
    for r, i in enumerate(idx):
      ids = data["ex_tokens"][starts[i]:starts[i + 1]]
      mask = data["ex_loss_mask"][starts[i]:starts[i + 1]]
      n = len(ids)
      tokens[r, :n], attn[r, :n] = ids, 1
      labels[r, :n] = np.where(mask != 0, ids, -100)
    yield tokens, attn, labels, int(attn.sum())


def peak_memory_gib(device: str) -> tuple[float, str]:
  if device.startswith("cuda"):
    return torch.cuda.max_memory_allocated() / 2**30, "torch.cuda.max_memory_allocated"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return (rss if sys.platform == "darwin" else rss * 1024) / 2**30, "host max RSS"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--hf-config", required=True, help="config.json of the model (jaxsft.hf)")
  p.add_argument("--data", required=True, help=".npz of rows or examples (module doc)")
  p.add_argument("--method", default="full")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--lr", type=float, default=1e-5)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--compile", action="store_true")
  p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  torch.manual_seed(args.seed)
  with open(args.hf_config) as f:
    hf_config = json.load(f)
  device = args.device
  cuda = device.startswith("cuda")
  if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True  # what HF's Trainer users set for fp32
    torch.backends.cudnn.allow_tf32 = True
  t0 = time.perf_counter()
  model = build_model(hf_config, args.method, device, args.remat)
  build_s = time.perf_counter() - t0
  trainable = [q for q in model.parameters() if q.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                          **({"fused": True} if cuda else {}))
  step_model = torch.compile(model) if args.compile else model
  autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                            enabled=args.dtype == "bfloat16")

  def step(tokens, attn, labels):
    to = lambda a: None if a is None else torch.from_numpy(a).to(device, torch.long)  # noqa: E731
    with autocast:
      loss = step_model(input_ids=to(tokens), attention_mask=to(attn), labels=to(labels)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()  # synchronizes

  data = np.load(args.data)
  times, padded, nonpad, first_s, loss = [], 0, 0, None, None
  for i, (tokens, attn, labels, real) in enumerate(batches(data)):
    t = time.perf_counter()
    loss = step(tokens, attn, labels)
    dt = time.perf_counter() - t
    first_s = dt if first_s is None else first_s
    if i >= args.warmup:
      times.append(dt)
      padded += tokens.size
      nonpad += real
  if not times:
    raise SystemExit(f"error: {args.data} has no batch after {args.warmup} warmup steps")
  # Rows all have one shape: the median step is robust to other processes'
  # bursts. Padded batches differ in shape, so their rate is totals over totals.
  total = statistics.median(times) * len(times) if "tokens" in data else sum(times)
  mem, mem_source = peak_memory_gib(device)
  result = {
      "peer": "hf",
      "method": args.method,
      "device": torch.cuda.get_device_name() if cuda else "cpu",
      "torch_version": torch.__version__,
      "transformers_version": transformers.__version__,
      "compiled": args.compile,
      "remat": args.remat,
      "build_s": build_s,
      "compile_s": first_s if args.compile else None,
      "steps": len(times),
      "step_s": statistics.median(times),
      "tokens_per_s": padded / total,
      "nonpad_tokens_per_s": nonpad / total,
      "trainable_params": sum(q.numel() for q in trainable),
      "peak_mem_gib": mem,
      "peak_memory_source": mem_source,
      "loss": loss,
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
