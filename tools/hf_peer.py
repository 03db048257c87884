"""The PyTorch peer of ``python -m jaxsft.bench --peer hf``: the same model,
tokens and method trained the way a Hugging Face user would.

    python tools/hf_peer.py --hf-config DIR/config.json --data DIR/batches.npz \
        [--method full|lora|dora] [--dtype bfloat16|float32] [--warmup 3] [--remat] \
        [--compile] [--device cuda|cpu] [--frozen-dtype auto|compute|param]

    python tools/hf_peer.py --paired --shape tiny --seq-len 512 --batch 8 --dtype float32

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
    target_modules="all-linear", lora_dropout=0.0, use_dora=...)`` (or
    ``--lora-rank R`` with alpha 2R, ``--lora-targets`` in jaxsft's names:
    module names, and expert targets as ``target_parameters``), the base
    weights frozen in fp32, or with ``--frozen-dtype compute`` (``auto`` on
    CUDA with bf16) cast to bf16 before PEFT wraps them, the adapters kept in
    fp32 (PEFT's ``autocast_adapter_dtype``): what jaxsft's
    ``stage.peft.frozen_dtype`` does, and how LLaMA-Factory loads a LoRA base;
    ``--quantization nf4`` (QLoRA) then swaps the base's linear layers for
    bitsandbytes' ``Linear4bit`` (NF4, double quantization), as
    ``load_in_4bit`` loads them;
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

``--paired`` takes ``python -m jaxsft.bench`` arguments (and ``--no-reuse-memory``:
leave glibc and async dispatch as they are, see ``jaxsft.host_memory``) instead and runs
jaxsft's step and the peer's alternately in one process (``paired``): the
fair comparison on a CPU shared with other work.

torch, transformers and peft are imported here only: jaxsft never needs them.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import time

import numpy as np
import torch
import transformers


# jaxsft's expert LoRA targets → the fused expert weights PEFT adapts
# (``target_parameters``, as jaxsft.peft.export writes them).
EXPERT_PARAMETERS = {"expert_gate_up": "mlp.experts.gate_up_proj",
                     "expert_down": "mlp.experts.down_proj"}


def build_model(hf_config: dict, method: str, device: str, remat: bool,
                frozen_bf16: bool = False, lora_rank: int = 16, lora_targets=None,
                quantization: str | None = None):
  """A randomly initialized fp32 model on ``device`` (built there: initializing
  an 8B model on the host would take minutes); ``frozen_bf16``: a LoRA/DoRA
  base held in bf16; LoRA of ``lora_rank`` (alpha twice that) on
  ``lora_targets`` (jaxsft's names; None: all-linear); ``quantization`` "nf4":
  QLoRA, the decoder's linear layers swapped for bitsandbytes' Linear4bit."""
  config = transformers.AutoConfig.for_model(**hf_config)
  config.use_cache = False
  with torch.device(device):
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="sdpa", dtype=torch.float32)
  if remat:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  if method in ("lora", "dora"):
    import peft  # noqa: PLC0415  (only the LoRA rows need it)
    if frozen_bf16:
      model = model.to(torch.bfloat16)
    if quantization:
      quantize_linears(model, quantization, device)
    modules = "all-linear"
    experts = None
    if lora_targets:  # jaxsft's names: HF module names, plus the fused expert weights
      modules = [t for t in lora_targets if t not in EXPERT_PARAMETERS] or None
      experts = [EXPERT_PARAMETERS[t] for t in lora_targets if t in EXPERT_PARAMETERS] or None
    lora = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=modules,
                           target_parameters=experts, lora_dropout=0.0,
                           use_dora=method == "dora", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
  elif method != "full":
    raise SystemExit(f"error: the peer runs --method full, lora or dora, not {method!r}")
  model.train()
  return model


def quantize_linears(model, quant_type: str, device: str) -> None:
  """QLoRA's base as transformers' ``load_in_4bit`` builds it: every
  ``nn.Linear`` of the decoder (not ``lm_head``) replaced by bitsandbytes'
  ``Linear4bit`` (double quantization, compute in the weights' dtype),
  quantized as it moves to ``device``."""
  import bitsandbytes as bnb  # noqa: PLC0415  (only the QLoRA rows need it)
  for name, module in list(model.named_modules()):
    for child_name, child in list(module.named_children()):
      if not isinstance(child, torch.nn.Linear) or child_name == "lm_head":
        continue
      dtype = child.weight.dtype
      q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                            compute_dtype=dtype, compress_statistics=True,
                            quant_type=quant_type, device="meta")
      q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                   compress_statistics=True, quant_type=quant_type)
      if child.bias is not None:
        q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
      setattr(module, child_name, q.to(device))
      del child


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


class Peer:
  """The model, optimizer and step (module doc); ``peer.step(tokens, attn, labels)``
  runs one optimizer step on numpy inputs and returns the loss."""

  def __init__(self, hf_config: dict, method: str, dtype: str, device: str, remat: bool,
               compile: bool, lr: float = 1e-5, seed: int = 0, frozen_dtype: str = "param",
               lora_rank: int = 16, lora_targets=None, quantization: str | None = None):
    torch.manual_seed(seed)
    self.device = device
    self.cuda = cuda = device.startswith("cuda")
    if cuda:
      torch.backends.cuda.matmul.allow_tf32 = True  # what HF's Trainer users set for fp32
      torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    # jaxsft's stage.peft.frozen_dtype rule: "auto" is "compute" on accelerators.
    self.frozen_bf16 = dtype == "bfloat16" and (
        frozen_dtype == "compute" or (frozen_dtype == "auto" and cuda))
    self.model = build_model(hf_config, method, device, remat,
                             self.frozen_bf16 and method in ("lora", "dora"), lora_rank,
                             lora_targets, quantization)
    self.build_s = time.perf_counter() - t0
    self.trainable = [q for q in self.model.parameters() if q.requires_grad]
    self.opt = torch.optim.AdamW(self.trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0.0, **({"fused": True} if cuda else {}))
    self.step_model = torch.compile(self.model) if compile else self.model
    self.autocast = lambda: torch.autocast(  # noqa: E731
        device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def step(self, tokens, attn, labels) -> float:
    def to(a):
      return None if a is None else torch.from_numpy(a).to(self.device, torch.long)
    with self.autocast():
      loss = self.step_model(input_ids=to(tokens), attention_mask=to(attn),
                             labels=to(labels)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.item()  # synchronizes


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
  p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
  p.add_argument("--lora-targets", type=lambda s: s.split(","),
                 help="jaxsft target names, comma separated (default all-linear)")
  p.add_argument("--frozen-dtype", default="param", choices=("auto", "compute", "param"),
                 help="LoRA/DoRA base weights: bf16 (compute; auto = compute on CUDA) or fp32")
  p.add_argument("--quantization", choices=("nf4",),
                 help="QLoRA: the base's linear layers in 4 bits (bitsandbytes' Linear4bit)")
  args = p.parse_args(argv)

  with open(args.hf_config) as f:
    hf_config = json.load(f)
  peer = Peer(hf_config, args.method, args.dtype, args.device, args.remat, args.compile,
              args.lr, args.seed, args.frozen_dtype, args.lora_rank, args.lora_targets,
              args.quantization)
  data = dict(np.load(args.data))
  times, padded, nonpad, first_s, loss = [], 0, 0, None, None
  for i, (tokens, attn, labels, real) in enumerate(batches(data)):
    t = time.perf_counter()
    loss = peer.step(tokens, attn, labels)
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
  mem, mem_source = peak_memory_gib(args.device)
  result = {
      "peer": "hf",
      "method": args.method,
      "device": torch.cuda.get_device_name() if peer.cuda else "cpu",
      "torch_version": torch.__version__,
      "transformers_version": transformers.__version__,
      "compiled": args.compile,
      "remat": args.remat,
      "frozen_dtype": ("bfloat16" if peer.frozen_bf16 and args.method in ("lora", "dora")
                       else None if args.method == "full" else "float32"),
      "build_s": peer.build_s,
      "compile_s": first_s if args.compile else None,
      "steps": len(times),
      "step_s": statistics.median(times),
      "tokens_per_s": padded / total,
      "nonpad_tokens_per_s": nonpad / total,
      "trainable_params": sum(q.numel() for q in peer.trainable),
      "peak_mem_gib": mem,
      "peak_memory_source": mem_source,
      "loss": loss,
  }
  print(json.dumps(result))
  return result


def paired(argv) -> dict:
  """``--paired BENCH_ARGS``: jaxsft's step and the peer's, alternating in one
  process, on one row batch shape (no --packed-lengths).

  On a machine shared with other work the load changes from minute to minute,
  so two runs one after the other compare two different machines. Here step
  i of each runs back to back, and the reported ratio is the median over i of
  peer_step_s / jaxsft_step_s (same tokens per step). CPU only.

  ``--threads N`` (first, before the bench arguments) limits both to N
  threads (``torch.set_num_threads``; XLA's ``intra_op_parallelism_threads``
  and no multi-threaded Eigen): with one thread each, time slicing by other
  processes slows both alike, whereas two threads that meet at barriers lose
  different amounts to a descheduled partner.
  """
  threads = None
  if argv[:1] == ["--threads"]:
    threads, argv = int(argv[1]), argv[2:]
    torch.set_num_threads(threads)
    flags = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} " \
            f"intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from jaxsft import bench, hf, host_memory  # noqa: PLC0415  (this mode only)
  bench.measure_real_compiles()
  # As python -m jaxsft.bench does; in this one process it serves the peer's
  # allocations too (torch allocates on the same main thread).
  if "--no-reuse-memory" in argv:
    argv = [a for a in argv if a != "--no-reuse-memory"]
  else:
    host_memory.reuse_freed_memory()

  args = bench.parse_args(argv)
  if args.packed_lengths or args.peer or args.compile_scaling or args.mesh:
    raise SystemExit("error: --paired compares one row shape on one device: drop "
                     "--packed-lengths, --peer, --compile-scaling and --mesh")
  cfg = bench.model_config(args)
  rows, _ = bench.make_data(cfg, args)
  peer = Peer(hf.config_to_hf(cfg), args.method, args.dtype, "cpu", args.remat != "none",
              False, seed=args.seed, frozen_dtype=args.frozen_dtype, lora_rank=args.lora_rank,
              lora_targets=args.lora_targets, quantization=args.quantization)
  runner = bench.StepRunner(cfg, args, rows, None)
  data = {"tokens": rows["tokens"], "loss_mask": rows["loss_mask"]}
  peer_batches = list(batches(data))
  jax_s, peer_s, ratios = [], [], []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    runner(i)
    t_jax = time.perf_counter() - t
    tokens, attn, labels, _ = peer_batches[i % len(peer_batches)]
    t = time.perf_counter()
    peer.step(tokens, attn, labels)
    t_peer = time.perf_counter() - t
    if i >= args.warmup:
      jax_s.append(t_jax)
      peer_s.append(t_peer)
      ratios.append(t_peer / t_jax)
  tokens = args.batch * args.seq_len
  result = {
      "paired": True, "shape": args.shape, "layers": cfg.num_layers, "batch": args.batch,
      "seq_len": args.seq_len, "dtype": args.dtype, "method": args.method,
      "steps": len(ratios), "compile_s": runner.compile_s,
      "step_s": statistics.median(jax_s), "peer_step_s": statistics.median(peer_s),
      "tokens_per_s": tokens / statistics.median(jax_s),
      "peer_tokens_per_s": tokens / statistics.median(peer_s),
      "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
      "ratios": ratios,
      "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  if sys.argv[1:2] == ["--paired"]:
    paired(sys.argv[2:])
  else:
    main()
