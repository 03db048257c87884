"""Benchmark CLI: throughput, MFU, compile time and memory of one real training step.

    python -m jaxsft.bench --shape tiny --seq-len 512 --batch 8 --steps 10 --dtype float32 --peer hf
    python -m jaxsft.bench --shape llama3.2-1b --seq-len 2048 --batch 8 --packed-lengths sft --peer hf
    python -m jaxsft.bench --shape llama3-8b --method lora --remat full --batch 4 --peer hf
    python -m jaxsft.bench --shape llama3-8b --compile-scaling 2,32 --seq-len 128 --batch 1
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m jaxsft.bench --shape qwen1.5-72b --method lora --compile-scaling 80 --mesh fsdp=8

Models come from ``SHAPES`` (published architectures, random weights, nothing
downloaded). Prints a table and, last, one JSON line.

What one step is. The trainer's own step, ``trainer.make_train_step`` under
``jax.jit`` with the state donated: forward, the masked next-token
cross-entropy (vocab-chunked, ``losses.masked_cross_entropy``; plus the router
loss for MoE), backward, global-norm clipping and the AdamW update
(``optim.build`` of ``config.stage(method=..., lr=1e-5)``). Its time, memory
and compile time therefore include the optimizer state and update. Methods
other than ``full`` add adapters through ``jaxsft.peft`` (``_prepare_method``).

The batch. Random tokens; by default every row is one sequence of
``--seq-len`` tokens whose first quarter is loss-masked (a prompt), so
non-pad tokens/s = tokens/s. With ``--packed-lengths DIST`` examples are drawn
(fixed seed) from a length distribution:

  * ``sft``: lognormal, median 250 tokens, σ = 0.8 (mean ≈ 345, 90th
    percentile ≈ 700, 99th ≈ 1,600: most examples a few hundred tokens, a long
    tail, as instruction/chat sets are), clipped to [16, seq_len];
  * ``fixed:N``: every example N tokens;

each example's first quarter loss-masked. jaxsft packs them best-fit into
rows of ``--seq-len`` (``data.packing``, segment ids and positions restarting
per example, exactly as the data pipeline does); as many examples are drawn as
fill ``(--warmup + --steps) × --batch`` rows. The peer gets the SAME examples
in the same order, ``--batch`` per batch, each batch padded to its longest
example (``DataCollatorWithPadding``). ``nonpad_tokens_per_s`` counts only
real tokens on both sides; ``nonpad_ratio`` compares them.

Timing. Compile once (``compile_s`` = wall time of ``jit(step).lower(...)
.compile()``), ``--warmup`` untimed steps, then ``--steps`` timed ones
(``jax.block_until_ready`` each); ``step_s`` is the median, tokens/s =
B·T / step_s, non-pad tokens/s = mean non-pad tokens per timed step / step_s.
On a shared machine, interleave runs and compare medians (docs/BENCHMARKS.md).

FLOPs and MFU (``jaxsft.metrics``, derivation there): matmul FLOPs ×3 (2
forward, 2 input-gradient, 2 weight-gradient per weight and token) plus causal
attention (the kept half of QKᵀ and PV, ×3); frozen weights (LoRA's base) cost
4 per token instead of 6, LoRA factors 6. Per step:

    flops = (6 · N_train + 4 · N_frozen) · tokens  +  12 · L · P · N·H

with P the causal (query, key) pairs of every sequence (every packed example),
and tokens the non-pad tokens. MFU = flops / step_s / peak, where peak is the
dense bf16 peak of the device (``metrics.PEAK_TFLOPS``) or ``--peak-tflops``;
null on CPU and for float32 compute. Hardware FLOPs are higher: remat and the
chunked loss recompute, the XLA attention path computes all T² scores, and MoE
uses the dense dispatch.

Peak memory: ``device.memory_stats()["peak_bytes_in_use"]`` (GPU, TPU); on CPU
the host process's max RSS (Python, compiler and initialization included).
``setup_peak_mem_gib`` is the same figure read before the first step (random
weights, adapters, optimizer state built): where it equals ``peak_mem_gib``,
the set-up, not the step, set the peak.

Several devices (``--mesh fsdp=8``, ``data=2,fsdp=4``, ...: the trainer's
``config.mesh`` axes over every device). The step is sharded exactly as the
trainer shards a stage: parameters by their axis letters
(``sharding.param_shardings``), optimizer moments as their parameter, the
rows of the batch over data × fsdp × expert; ``--batch`` is the global batch.
tokens/s is global (``tokens_per_s_per_device`` beside it), MFU is over
n_devices × the peak, peak memory is the busiest device's, and the memory
check compares the compiled step's per-device figure with one device's
memory. That figure is per device: ``memory_analysis()`` of a sharded
executable describes the partitioned (SPMD) program one device runs; its
argument bytes equal, to the byte, the state's shards on one device
(``state_bytes_per_device``, from the shardings' shard shapes) plus one
device's rows of the batch (tests/test_bench.py checks it). On a CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` simulates 8 devices,
enough to read what a sharded step needs per device (``--compile-scaling``
with ``--mesh`` compiles without allocating anything); the simulated devices
share the host's memory, so there the check compares the sum over devices
with it. The peer is single-device and a per-device ratio against it would
compare different programs (collectives, a global batch), so ``--peer``
(and ``tools/hf_peer.py --paired``) take no ``--mesh``.

The peer (``--peer hf``): ``tools/hf_peer.py`` (Transformers + PyTorch, bf16
autocast, fp32 master weights, SDPA, fused AdamW; PEFT LoRA for lora/dora, by
default r=16 α=32 on all linear layers, else ``--lora-rank`` (α twice it) and
``--lora-targets`` on both sides; its docstring has the details) on the same model
(``hf.config_to_hf``), tokens, masks and method, run as a subprocess BEFORE
this process initializes JAX's backend, so the two never hold device memory at
once. ``--peer hf-compile`` (or ``--peer-compile``) runs the same peer under
``torch.compile`` (inductor; it needs a C++ compiler on CPU, Triton on GPU),
its compile time landing in the warmup steps. On CPU, compare in
``--dtype float32``: neither side has fast bf16 matmuls on a CPU without
AVX512-BF16/AMX (PyTorch's bf16 autocast ran 35x slower there).

Other modes.
  * ``--compile-scaling 2,32``: lower and compile the step (``--method``,
    sharded by ``--mesh``) from ``jax.ShapeDtypeStruct`` inputs at each layer
    count (no weight allocated, so full-size shapes compile on a laptop);
    with layers under ``nn.scan`` compile time should barely grow with depth.
    Depths are interleaved over ``--repeats``, the fastest kept; ``cpu_s``
    (process CPU time) is reported beside wall time because other processes
    disturb it much less. Each row also gives the compiled step's memory per
    device (``memory_bytes_per_device``, as the memory check reads it). One
    count (``--compile-scaling 80 --mesh fsdp=8``) just answers what that
    depth needs per device.
  * ``--profile DIR``: after the timed steps, trace ``--profile-steps`` more
    into DIR with ``jax.profiler`` (TensorBoard / Perfetto / XProf read it),
    write the compiled step's HLO beside it, and print and save
    (DIR/summary.txt, summary.json) where the time went: by category, by
    source line, the top ops (``jaxsft.trace_report``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import config as config_lib
from jaxsft import aot, hf, host_memory, losses, metrics, optim, trace_report, trainer
from jaxsft import sharding as sharding_lib
from jaxsft.data import packing
from jaxsft.models import llama, mixtral
from jaxsft.models.model_config import (FUSED_PROJECTIONS, MOE_DISPATCHES, REMAT_POLICIES,
                                         ModelConfig)
from jaxsft.peft import nf4
from jaxsft.peft import methods as peft_methods

METHODS = ("full", "lora", "dora", "full_then_lora", "freeze")
PEERS = ("hf", "hf-compile")  # hf-compile: the same peer under torch.compile
PEER_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "tools" / "hf_peer.py"
# The "sft" length distribution (module doc).
SFT_MEDIAN, SFT_SIGMA, MIN_EXAMPLE = 250, 0.8, 16

# Published architectures (the ``config.json`` of the named checkpoints;
# tests/test_real_sizes.py checks them against jaxsft.hf.config_from_hf).
# Numeric policy (dtypes, remat) comes from the command line.
SHAPES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        family="llama", vocab_size=8192, hidden_size=256, intermediate_size=688,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64),
    "tiny-moe": ModelConfig(  # "tiny" with 8 experts, top-2 (a CPU-sized Mixtral)
        family="mixtral", vocab_size=8192, hidden_size=256, intermediate_size=688,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, num_experts=8),
    # meta-llama/Llama-3.2-1B
    "llama3.2-1b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling=(("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                      ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))),
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=8192),
    # Qwen/Qwen2-7B
    "qwen2-7b": ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=131072, qkv_bias=True),
    # 01-ai/Yi-34B (Llama architecture)
    "yi-34b": ModelConfig(
        family="llama", vocab_size=64000, hidden_size=7168, intermediate_size=20480,
        num_layers=60, num_heads=56, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=5000000.0, max_position_embeddings=4096),
    # Qwen/Qwen1.5-72B(-Chat)
    "qwen1.5-72b": ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=24576,
        num_layers=80, num_heads=64, num_kv_heads=64, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=32768, qkv_bias=True),
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": ModelConfig(
        family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=1000000.0, max_position_embeddings=32768, num_experts=8,
        num_experts_per_tok=2),
}

# ----------------------------------------------------------------------------- accounting

def param_count(params) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def memory_estimate(cfg: ModelConfig, batch: int, seq_len: int, method: str = "full") -> int:
  """A rough upper estimate, in bytes, of what one training step holds.

  Weights (param dtype); for ``full`` also their fp32 gradients (twice: the
  accumulator and the step's own) and AdamW's two moments, while LoRA-style
  methods train a negligible number of weights. Plus activations kept for the
  backward pass: per layer and token about 10·D + 4·F' values in the compute
  dtype (F' = E·F, the dense MoE dispatch's: an upper bound for the bucketed
  and dropless ones) and the fp32 attention scores
  and probabilities (2·N·T per token); with remat only each layer's input is
  kept, plus one layer's worth being recomputed. Plus one loss chunk's logits.
  It decides whether to refuse a shape, not how big a batch fits.
  """
  p_bytes = jnp.dtype(cfg.param_dtype).itemsize
  c_bytes = jnp.dtype(cfg.dtype).itemsize
  tokens = batch * seq_len
  f_eff = cfg.intermediate_size * max(cfg.num_experts, 1)
  layer = tokens * ((10 * cfg.hidden_size + 4 * f_eff) * c_bytes
                    + 2 * cfg.num_heads * seq_len * 4)
  if cfg.remat == "none":
    activations = cfg.num_layers * layer
  else:
    activations = cfg.num_layers * tokens * cfg.hidden_size * c_bytes + layer
  logits = 3 * batch * min(seq_len, cfg.loss_chunk or losses.DEFAULT_CHUNK_SIZE) * cfg.vocab_size * 4
  weights = param_count(llama.abstract_params(cfg))
  per_weight = p_bytes + (2 * 4 + 2 * p_bytes if method == "full" else 0)
  return weights * per_weight + activations + logits


def available_memory(device) -> tuple[int | None, str]:
  """Bytes the step may use, and where that figure comes from."""
  limit = sharding_lib.device_bytes(device)
  if limit is not None:
    return int(limit), "device bytes_limit"
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024, "host MemAvailable"
  except OSError:
    pass
  return None, "unknown"


def peak_memory(device) -> tuple[int, str]:
  """Peak bytes in use so far, and whether it is the device's count or the host RSS."""
  peak = sharding_lib.device_peak_bytes(device)
  if peak is not None:
    return peak, "device peak_bytes_in_use"
  # ru_maxrss is KiB on Linux, bytes on macOS.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024), "host max RSS"


def method_weights(base_cfg: ModelConfig, cfg: ModelConfig, params, trainable) -> tuple[float, float]:
  """(frozen, adapter) per-token matmul weights for ``metrics.train_flops``:
  base weights that get no gradient, and added weights that train."""
  if trainable is None:
    return 0.0, 0.0
  base = {sharding_lib.path_names(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(llama.abstract_params(base_cfg))[0]}
  frozen = adapter = 0.0
  for (path, leaf), train in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree_util.tree_leaves(trainable)):
    names = sharding_lib.path_names(path)
    count = metrics.matmul_weight_count(cfg, names, leaf.shape)
    if names in base and not train:
      frozen += count
    elif names not in base and train:
      adapter += count
  return frozen, adapter


# ----------------------------------------------------------------------------- the data

def parse_lengths(spec: str) -> tuple[str, int]:
  """``sft`` or ``fixed:N`` → (kind, N)."""
  if spec == "sft":
    return "sft", 0
  if spec.startswith("fixed:"):
    try:
      n = int(spec[len("fixed:"):])
    except ValueError:
      n = 0
    if n > 0:
      return "fixed", n
  raise argparse.ArgumentTypeError(
      f"--packed-lengths wants 'sft' or 'fixed:N' (N a positive token count); got {spec!r}")


def draw_lengths(spec: str, n: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
  """``n`` example lengths from the distribution ``spec`` (module doc), clipped to seq_len."""
  kind, fixed = parse_lengths(spec)
  if kind == "fixed":
    lengths = np.full(n, fixed)
  else:
    lengths = np.rint(rng.lognormal(np.log(SFT_MEDIAN), SFT_SIGMA, n))
  return np.clip(lengths, min(MIN_EXAMPLE, seq_len), seq_len).astype(np.int64)


def _prompt_masked(length: int) -> np.ndarray:
  """The loss mask of one example or row: its first quarter is the (untrained) prompt."""
  mask = np.ones(length, np.int32)
  mask[:length // 4] = 0
  return mask


def row_batches(cfg: ModelConfig, n_batches: int, batch: int, seq_len: int, seed: int) -> dict:
  """Unpacked data: ``n_batches`` × [B, T] random tokens, one sequence per row.

  No segment ids or positions: a row that is one example without padding
  needs no attention mask beyond causality (as the peer gets none).
  """
  rng = np.random.default_rng(seed)
  shape = (n_batches, batch, seq_len)
  return {
      "tokens": rng.integers(0, cfg.vocab_size, shape, dtype=np.int32),
      "loss_mask": np.broadcast_to(_prompt_masked(seq_len), shape).copy(),
  }


def packed_batches(cfg: ModelConfig, spec: str, n_batches: int, batch: int, seq_len: int,
                   seed: int) -> tuple[dict, dict]:
  """Packed data: (rows [n_batches, B, T] as ``row_batches``, the examples).

  Draws the largest prefix of a seeded stream of examples that best-fit packs
  into exactly ``n_batches × batch`` rows; the examples are what the peer
  trains on: ``ex_tokens``/``ex_loss_mask`` end to end, ``ex_lengths``, and
  ``lengths_per_batch`` (the lengths packed into each batch, for FLOPs).
  """
  rng = np.random.default_rng(seed)
  rows_needed = n_batches * batch
  mean = seq_len if parse_lengths(spec)[0] == "fixed" else SFT_MEDIAN
  pool = draw_lengths(spec, 2 * rows_needed * max(1, seq_len // mean) + 64, seq_len, rng)
  while len(packing.best_fit_decreasing(pool, seq_len)) < rows_needed + 1:
    pool = np.concatenate([pool, draw_lengths(spec, len(pool), seq_len, rng)])
  lo, hi = 1, len(pool)  # largest n whose rows fit: rows(n) is (about) monotone in n
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if len(packing.best_fit_decreasing(pool[:mid], seq_len)) <= rows_needed:
      lo = mid
    else:
      hi = mid - 1
  lengths = pool[:lo]
  tokens = rng.integers(0, cfg.vocab_size, int(lengths.sum()), dtype=np.int32)
  starts = np.concatenate([[0], np.cumsum(lengths)])
  masks = np.concatenate([_prompt_masked(int(n)) for n in lengths])
  examples = [(tokens[starts[i]:starts[i + 1]], masks[starts[i]:starts[i + 1]])
              for i in range(len(lengths))]
  arrays, rows = packing.pack(examples, seq_len)
  while len(rows) < rows_needed:  # rows(n) not quite monotone: pad with empty rows
    rows.append([])
    arrays = {k: np.concatenate([v, np.zeros((1, seq_len), v.dtype)]) for k, v in arrays.items()}
  order = rng.permutation(len(rows))  # the pipeline shuffles rows too
  arrays = {k: v[order].reshape(n_batches, batch, seq_len) for k, v in arrays.items()}
  rows = [rows[i] for i in order]
  per_batch = [np.array([lengths[i] for r in rows[b * batch:(b + 1) * batch] for i in r])
               for b in range(n_batches)]
  return arrays, {"ex_tokens": tokens, "ex_loss_mask": masks, "ex_lengths": lengths,
                  "lengths_per_batch": per_batch}


# ----------------------------------------------------------------------------- the peer

def run_peer(cfg: ModelConfig, args, rows: dict, examples: dict | None) -> dict:
  """Run tools/hf_peer.py on the same model and data; its JSON line as a dict.

  Must run before this process initializes a JAX backend: JAX preallocates
  most of a GPU's memory when it starts.
  """
  if not PEER_SCRIPT.is_file():
    raise SystemExit(f"error: --peer hf needs {PEER_SCRIPT} (tools/ of the jaxsft source tree)")
  with tempfile.TemporaryDirectory(prefix="jaxsft-peer-") as tmp:
    config_path, data_path = pathlib.Path(tmp, "config.json"), pathlib.Path(tmp, "data.npz")
    config_path.write_text(json.dumps(hf.config_to_hf(cfg)))
    if examples is None:
      np.savez(data_path, tokens=rows["tokens"], loss_mask=rows["loss_mask"])
    else:
      np.savez(data_path, ex_tokens=examples["ex_tokens"], ex_loss_mask=examples["ex_loss_mask"],
               ex_lengths=examples["ex_lengths"], batch=args.batch)
    cmd = [sys.executable, str(PEER_SCRIPT), "--hf-config", str(config_path),
           "--data", str(data_path), "--method", args.method, "--dtype", args.dtype,
           "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.remat != "none":
      cmd.append("--remat")
    cmd += ["--frozen-dtype", args.frozen_dtype, "--lora-rank", str(args.lora_rank)]
    if args.lora_targets:
      cmd += ["--lora-targets", ",".join(args.lora_targets)]
    if args.quantization:
      cmd += ["--quantization", args.quantization]
    if args.peer_compile or args.peer == "hf-compile":
      cmd.append("--compile")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # in case anything imports jax there
    print("peer:", " ".join(cmd[1:]), flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
  lines = out.stdout.strip().splitlines()
  if out.returncode != 0 or not lines:
    raise SystemExit(f"error: the peer ({PEER_SCRIPT.name}) failed with exit code "
                     f"{out.returncode}; its output is above")
  return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the step

def make_stage(args):
  """The stage a bench step trains: the method, AdamW at lr 1e-5, clipping 1.0."""
  rank = getattr(args, "lora_rank", 16)
  targets = getattr(args, "lora_targets", None) or "all-linear"
  return config_lib.stage(method=args.method, lr=1e-5, batch_size=args.batch,
                          seq_len=args.seq_len, warmup_steps=0, schedule="constant",
                          peft=dict(frozen_dtype=getattr(args, "frozen_dtype", "auto"),
                                    rank=rank, alpha=2.0 * rank, targets=targets,
                                    quantization=getattr(args, "quantization", None)))


def _prepare_method(cfg: ModelConfig, params, stage, rng):
  """The model the stage trains: ``cfg``/``params`` with ``stage.method``'s
  adapters added (``jaxsft.peft.methods.prepare``); ``full`` adds none."""
  if stage.method == "full":
    return cfg, params
  return peft_methods.prepare(cfg, params, stage, rng)


def build_step(cfg: ModelConfig, params, stage, total_steps: int, seed: int, mesh=None):
  """(train step, ``store(params)``, ``init(stored params) -> state``,
  trainable mask of the stored parameters or None), unjitted. ``params`` may
  be abstract (only shapes are read); ``store`` holds frozen weights as the
  trainer does (``trainer.store_params``: the frozen dtype, QLoRA's 4 bits;
  leaf by leaf, outside the init program, so the peak stays one leaf above
  the tree), on ``mesh``."""
  if stage.method == "full":
    tx, lr_fn = optim.build(stage, total_steps, params, cfg.dtype)
    step = trainer.make_train_step(cfg, tx, lr_fn, 1)
    init = lambda p: trainer.init_state(p, tx, seed)  # noqa: E731
    return step, (lambda p: p), init, None
  # The trainer's frozen/trainable split (jaxsft.peft's issue), built for
  # the parameters as the state holds them.
  raw = optim.trainable_mask(params, stage)
  store = lambda p: trainer.store_params(p, raw, stage, cfg, mesh)  # noqa: E731
  stored = jax.eval_shape(store, params)
  tx, lr_fn = optim.build(stage, total_steps, stored, cfg.dtype)
  trainable = optim.trainable_mask(stored, stage)
  step = trainer.make_train_step(cfg, tx, lr_fn, 1, trainable)
  init = lambda p: trainer.init_state(p, tx, seed, trainable)  # noqa: E731
  return step, store, init, trainable


def bench_mesh(args) -> jax.sharding.Mesh:
  """The mesh the step runs on: ``--mesh`` over every device, else the first
  device alone; with ``--target NAME[:N]``, over N compile-only devices of
  that GPU (fsdp over all of them without ``--mesh``). Clear errors for a mesh
  the devices or the batch cannot fill."""
  target = getattr(args, "target", None)
  devices = None
  if target:
    try:
      devices = aot.devices(target)
    except ValueError as e:
      _usage_error(f"--target: {e}")
  if not getattr(args, "mesh", None):
    if devices:  # all of the target's devices, as --mesh fsdp=-1 takes all here
      return sharding_lib.make_mesh({"fsdp": -1}, devices)
    return sharding_lib.make_mesh({"fsdp": 1}, jax.devices()[:1])
  try:
    mesh = sharding_lib.make_mesh(args.mesh, devices)
  except ValueError as e:
    _usage_error(f"--mesh: {e} (XLA_FLAGS=--xla_force_host_platform_device_count=N "
                 "simulates N devices on a CPU)")
  rows = sharding_lib.data_parallel_size(mesh)
  if args.batch % rows:
    _usage_error(f"--batch {args.batch} (the global batch) does not split over the mesh's "
                 f"{rows} data-parallel devices (data x fsdp x expert of {dict(mesh.shape)}); "
                 f"use a multiple of {rows}")
  return mesh


def _usage_error(message: str):
  """Bad command-line input found after parsing (it needs the devices): say so
  and exit 2, as argparse does for what it can check itself."""
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


@dataclasses.dataclass
class ShardedStep:
  """A stage's train step jitted with the trainer's shardings (``sharded_step``)."""
  step: Any  # jax.jit(train step), state donated
  mesh: jax.sharding.Mesh
  abstract_state: Any
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  store: Callable  # params -> params as the state holds them (frozen dtype)
  init: Callable  # stored params -> TrainState
  trainable: Any  # mask, or None for full

  def lower(self, batch):
    """Lower for ``batch`` (ShapeDtypeStructs of one global batch) under the
    mesh, as ``sharding.with_mesh`` calls the trainer's step: the MoE dispatch
    reads it while tracing."""
    with jax.set_mesh(self.mesh):
      return self.step.lower(self.abstract_state, batch)

  def compile(self, batch):
    """``lower`` and compile."""
    return self.lower(batch).compile()


def sharded_step(cfg: ModelConfig, params, stage, total_steps: int, seed: int,
                 mesh) -> ShardedStep:
  """The step sharded exactly as the trainer shards a stage (``trainer._Phase``):
  parameters by their axis letters (``sharding.param_shardings``), optimizer
  moments as their parameter (``trainer._state_shardings``), the batch's rows
  over the data-parallel axes (``trainer.batch_sharding``). ``params`` may be
  abstract. On a one-device mesh every sharding is trivial."""
  step, store, init, trainable = build_step(cfg, params, stage, total_steps, seed, mesh)
  stored = jax.eval_shape(store, params)
  abstract_state = jax.eval_shape(init, stored)
  state_shardings = trainer._state_shardings(
      abstract_state, sharding_lib.param_shardings(stored, mesh), mesh)
  bsh = trainer.batch_sharding(mesh)
  jitted = jax.jit(step, in_shardings=(state_shardings, bsh),
                   out_shardings=(state_shardings, None), donate_argnums=0)
  return ShardedStep(jitted, mesh, abstract_state, state_shardings, bsh, store, init, trainable)


class StepRunner:
  """The jitted train step on random weights, compiled, with its batches on
  the device: ``runner(i)`` runs step i (batch i mod n) to completion and
  returns its metrics. Also used by tools/hf_peer.py --paired.

  The step is compiled from abstract shapes first, so the memory check reads
  the compiled step's own figure (``sharding.compiled_memory``) before any weight is
  allocated; ``memory_estimate`` (analytic) is the fallback where the backend
  reports none. The same executable then runs on the real state."""

  def __init__(self, cfg: ModelConfig, args, rows: dict, examples: dict | None):
    self.mesh = mesh = bench_mesh(args)
    self.devices = list(mesh.devices.flat)
    self.device = device = self.devices[0]
    self.args, self.rows, self.examples = args, rows, examples
    base_cfg = cfg
    stage = make_stage(args)
    rng = jax.random.key(args.seed)
    cfg, abstract = _prepare_method(cfg, llama.abstract_params(cfg), stage, rng)
    self.cfg = cfg
    self.params = param_count(abstract)
    total_steps = args.warmup + args.steps + args.profile_steps
    sh = sharded_step(cfg, abstract, stage, total_steps, args.seed, mesh)
    self.batch_sharding = bsh = sh.batch_sharding
    batch0 = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in rows.items()}
    t0 = time.perf_counter()
    self.compiled = sh.compile(batch0)
    self.compile_s = time.perf_counter() - t0
    self._check_memory(base_cfg, args, device)
    # Random weights, initialized under jit so the whole tree is built in one
    # program (eager init would hold every intermediate op's buffers), placed
    # shard by shard, frozen ones already in the stage's frozen dtype (as the
    # trainer reads them: no fp32 copy of a LoRA base on the device first).
    base_abstract = llama.abstract_params(base_cfg)
    base_shardings = sharding_lib.param_shardings(base_abstract, mesh)
    dtypes = optim.load_dtypes(base_abstract, stage, base_cfg.dtype, base_cfg.param_dtype)
    params = llama.init_placed(base_cfg, rng, base_shardings, dtypes)
    cfg_real, params = _prepare_method(base_cfg, params, stage, jax.random.fold_in(rng, 1))
    assert cfg_real == cfg, (cfg_real, cfg)
    self.state = trainer.build_state(sh.init, sh.store(params), sh.state_shardings)
    del params
    # What the busiest device really holds of the state (its placed shards).
    self.state_bytes_per_device = max(
        sum(s.data.nbytes for x in jax.tree_util.tree_leaves(self.state)
            for s in x.addressable_shards if s.device == d) for d in self.devices)
    trainable = sh.trainable
    # Matmul weights counted as the model has them (QLoRA stores some in parts).
    self.frozen, self.adapter = method_weights(
        base_cfg, cfg, abstract, None if trainable is None else optim.trainable_mask(abstract,
                                                                                   stage))
    self.trainable_params = self.params if trainable is None else int(sum(
        np.prod(x.shape) for x, t in zip(jax.tree_util.tree_leaves(self.state.params),
                                         jax.tree_util.tree_leaves(trainable)) if t))
    self.batches = [{k: jax.device_put(v[i], bsh) for k, v in rows.items()}
                    for i in range(len(rows["tokens"]))]
    jax.block_until_ready((self.state, self.batches))
    # The peak so far is the set-up's (random init, adapters, optimizer state),
    # before any step: beside the final peak it says which of the two set it.
    self.setup_peak, _ = max(peak_memory(d) for d in self.devices)

  def _check_memory(self, base_cfg: ModelConfig, args, device) -> None:
    need = sharding_lib.compiled_memory(self.compiled)
    self.memory_estimate_source = "compiled memory_analysis"
    if need is None:
      need = memory_estimate(base_cfg, args.batch, args.seq_len, args.method)
      self.memory_estimate_source = "analytic memory_estimate"
    self.memory_estimate = need
    have, have_source = available_memory(device)
    where = "per device"
    if have_source == "host MemAvailable" and len(self.devices) > 1:
      # Simulated CPU devices all live in the host's memory.
      need *= len(self.devices)
      where += f", {need / 2**30:.1f} GiB for all {len(self.devices)} devices of one host"
    if have is not None and need > have and not args.skip_memory_check:
      raise SystemExit(
          f"error: shape {args.shape!r} with {base_cfg.num_layers} layers, batch {args.batch}, "
          f"seq_len {args.seq_len}, method {args.method} needs "
          f"{self.memory_estimate / 2**30:.1f} GiB {where} "
          f"(weights, gradients, optimizer state, activations; {self.memory_estimate_source}) "
          f"but {have / 2**30:.1f} GiB is available ({have_source} on {device.platform}). "
          f"Shrink it with --layers N, a smaller --batch/--seq-len, --param-dtype bfloat16, "
          f"--remat full or a LoRA --method; or measure compile time only with "
          f"--compile-scaling, which allocates no weights. --skip-memory-check overrides.")

  def __call__(self, i: int) -> dict:
    self.state, out = self.compiled(self.state, self.batches[i % len(self.batches)])
    return jax.block_until_ready(out)

  def nonpad(self, i: int) -> int:
    if "segment_ids" not in self.rows:
      return self.args.batch * self.args.seq_len
    return int(np.count_nonzero(self.rows["segment_ids"][i % len(self.batches)]))

  def flops(self, i: int) -> float:
    """Model FLOPs of step i (``metrics.train_flops``; packed: its examples)."""
    lengths = (None if self.examples is None
               else self.examples["lengths_per_batch"][i % len(self.batches)])
    return metrics.train_flops(self.cfg, self.args.batch, self.args.seq_len, frozen=self.frozen,
                               adapter=self.adapter, lengths=lengths)


def profile(runner: StepRunner, args) -> None:
  """Trace ``--profile-steps`` more steps into ``--profile`` DIR, with the
  compiled step's HLO beside the trace, and print where the time went
  (``jaxsft.trace_report``; ``python -m jaxsft.trace_report DIR`` reprints it)."""
  out = pathlib.Path(args.profile)
  out.mkdir(parents=True, exist_ok=True)
  (out / trace_report.HLO_FILE).write_text(runner.compiled.as_text())
  jax.profiler.start_trace(str(out), create_perfetto_trace=True)
  for i in range(args.profile_steps):
    with jax.profiler.StepTraceAnnotation(trace_report.STEP_EVENT, step_num=i):
      runner(args.warmup + args.steps + i)
  jax.profiler.stop_trace()
  summary = trace_report.summarize(out)
  (out / "summary.json").write_text(json.dumps(summary))
  report = trace_report.format_report(summary)
  (out / "summary.txt").write_text(report + "\n")
  print(report, flush=True)


def run_steps(cfg: ModelConfig, args, rows: dict, examples: dict | None) -> dict:
  runner = StepRunner(cfg, args, rows, examples)
  for i in range(args.warmup):
    runner(i)
  times, nonpad, flops, overflow, out = [], [], [], [], None
  for i in range(args.warmup, args.warmup + args.steps):
    t = time.perf_counter()
    out = runner(i)
    times.append(time.perf_counter() - t)
    nonpad.append(runner.nonpad(i))
    flops.append(runner.flops(i))
    if "moe_bucket_overflow" in out:
      overflow.append(float(out["moe_bucket_overflow"]))
  if args.profile:
    profile(runner, args)
  step_s = statistics.median(times)
  flops_per_step = statistics.mean(flops)
  peak = args.peak_tflops or metrics.peak_tflops(runner.device, args.dtype)
  n = len(runner.devices)
  # The busiest device's peak (one figure per device; on CPU the process RSS).
  mem, mem_source = max(peak_memory(d) for d in runner.devices)
  return {
      **mesh_fields(runner.mesh),
      "step": f"train step ({args.method}, AdamW, grad clip)",
      "params": runner.params,
      "trainable_params": runner.trainable_params,
      "compile_s": runner.compile_s,
      "step_s": step_s,
      "step_s_min": min(times),
      "step_s_max": max(times),
      "tokens_per_s": args.batch * args.seq_len / step_s,
      "tokens_per_s_per_device": args.batch * args.seq_len / step_s / n,
      "nonpad_tokens_per_s": statistics.mean(nonpad) / step_s,
      "nonpad_fraction": statistics.mean(nonpad) / (args.batch * args.seq_len),
      "flops_per_step": flops_per_step,
      "tflops_per_s": flops_per_step / step_s / 1e12,
      "peak_tflops": peak,
      "mfu": None if peak is None else flops_per_step / step_s / (peak * 1e12 * n),
      "peak_mem_gib": mem / 2**30,
      "peak_memory_bytes": mem,
      "setup_peak_mem_gib": runner.setup_peak / 2**30,
      "peak_memory_source": mem_source,
      "memory_estimate_bytes": runner.memory_estimate,
      "memory_estimate_source": runner.memory_estimate_source,
      "state_bytes_per_device": runner.state_bytes_per_device,
      "loss": float(out["loss"]),
      # MoE: share of the timed steps' layer calls that overflowed the bucketed
      # dispatch's first buckets (and ran bigger ones).
      "moe_bucket_overflow": statistics.mean(overflow) if overflow else None,
      # As run: "auto" resolved on the devices of the step's mesh.
      "fused_projections": _fused_as_run(runner.cfg, runner.mesh),
  }


def _fused_as_run(cfg: ModelConfig, mesh) -> str:
  """"on" or "off": whether the step ran q/k/v as one matmul
  (``llama.fuses_projections`` under ``mesh``; "auto" resolved)."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return "on" if llama.fuses_projections(cfg, ("q_dnh", "k_dkh", "v_dkh")) else "off"


def compile_step(cfg: ModelConfig, batch: int, seq_len: int, stage, mesh, seed: int = 0):
  """Lower and compile the stage's train step from abstract inputs, sharded
  over ``mesh`` as the trainer shards it (``sharded_step``); nothing allocated.

  Returns (compiled, times, state_bytes_per_device) with wall-clock
  ``lower_s``, ``compile_s`` and ``cpu_s``, the process CPU time of both (all
  threads): on a shared machine other processes stretch the wall time, much
  less the CPU time.
  """
  cfg, params = _prepare_method(cfg, llama.abstract_params(cfg), stage, jax.random.key(seed))
  row = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  batch_struct = {"tokens": row, "loss_mask": row}
  sh = sharded_step(cfg, params, stage, 10, seed, mesh)
  c0, t0 = time.process_time(), time.perf_counter()
  lowered = sh.lower(batch_struct)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  state_bytes = sharding_lib.bytes_per_device(sh.abstract_state, sh.state_shardings)
  return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1, "cpu_s": c2 - c0}, state_bytes


def run_compile_scaling(cfg: ModelConfig, args) -> dict:
  depths = args.compile_scaling
  mesh = bench_mesh(args)
  # Under the mesh's abstract form, so that the step is built for its devices'
  # platform (sharding.compute_platform: a --target GPU's, not this host's)
  # while eager work (the adapters' random init) stays on this host.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return _compile_scaling(cfg, args, depths, mesh)


def _compile_scaling(cfg: ModelConfig, args, depths, mesh) -> dict:
  stage = make_stage(args)
  limit = (aot.device_limit(args.target) if args.target
           else sharding_lib.device_bytes(mesh.devices.flat[0]))
  compile_at = lambda layers: compile_step(  # noqa: E731
      cfg.replace(num_layers=layers), args.batch, args.seq_len, stage, mesh, args.seed)
  # One throwaway compile first, so one-time costs (backend start-up, lowering
  # rule registration) do not land on the first measured depth.
  compile_at(depths[0])
  # Depths are interleaved across repeats so that a burst of load from other
  # processes hits all of them alike; the fastest repeat of each is reported,
  # since interference only ever adds time.
  runs: dict[int, list] = {layers: [] for layers in depths}
  for _ in range(args.repeats):
    for layers in depths:
      runs[layers].append(compile_at(layers))
  rows = []
  for layers in depths:
    compiled, best, state_bytes = min(
        runs[layers], key=lambda r: r[1]["lower_s"] + r[1]["compile_s"])
    mem = compiled.memory_analysis()
    need = sharding_lib.compiled_memory(compiled)
    rows.append({
        "layers": layers,
        "params": param_count(llama.abstract_params(cfg.replace(num_layers=layers))),
        **best,
        "total_s": best["lower_s"] + best["compile_s"],
        "cpu_s": min(t["cpu_s"] for _, t, _ in runs[layers]),
        # XLA's analysis of the partitioned program: one device's buffers.
        "memory_bytes_per_device": need,
        "argument_bytes": None if mem is None else int(mem.argument_size_in_bytes),
        "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
        # What the shardings put on one device: weights, optimizer state, step.
        "state_bytes_per_device": state_bytes,
        "device_bytes_limit": limit,
        "fits": None if limit is None or need is None else need <= limit,
    })
  return {
      **mesh_fields(mesh),
      # Resolved here, under the mesh: a --target GPU's dispatch.
      "moe_dispatch": mixtral.resolve_dispatch(cfg) if cfg.is_moe else None,
      "step": f"train step ({args.method}, AdamW), compiled from abstract inputs",
      "compile_scaling": rows,
      "repeats": args.repeats,
      "compile_ratio": rows[-1]["total_s"] / rows[0]["total_s"],
      "compile_cpu_ratio": rows[-1]["cpu_s"] / rows[0]["cpu_s"],
  }


def mesh_fields(mesh) -> dict:
  """The JSON line's ``mesh`` (axes of size > 1, None for one device) and ``n_devices``."""
  return {"mesh": sharding_lib.split_axes(mesh) or None,
          "n_devices": int(mesh.size)}


# ----------------------------------------------------------------------------- CLI

def _layer_list(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) <= 0:
    raise argparse.ArgumentTypeError(
        f"--compile-scaling wants positive layer counts like 2,32 (or one, e.g. 80, to read "
        f"what that depth needs); got {text!r}")
  return values


def _lengths_arg(text: str) -> str:
  parse_lengths(text)
  return text


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jaxsft.bench", description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  p.add_argument("--method", default="full", choices=METHODS)
  p.add_argument("--layers", type=int, help="override the shape's layer count")
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--batch", type=int, default=8, help="rows per step (and the peer's examples "
                 "per batch with --packed-lengths)")
  p.add_argument("--steps", type=int, default=10, help="timed steps (normal mode)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
  p.add_argument("--frozen-dtype", default="auto", choices=peft_methods.FROZEN_DTYPES,
                 help="frozen (LoRA base) weights in the compute dtype or the parameter dtype "
                      "(stage.peft.frozen_dtype; auto: compute on GPU/TPU); the peer does the same")
  p.add_argument("--quantization", choices=peft_methods.QUANTIZATIONS,
                 help="--method lora only: QLoRA, the frozen projections in 4 bits "
                      "(stage.peft.quantization, double quantization on); the peer loads its "
                      "base with bitsandbytes' Linear4bit the same way")
  p.add_argument("--remat", default="none", choices=REMAT_POLICIES,
                 help="jaxsft's remat policy; the peer uses gradient checkpointing unless none")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="compute dtype of matmuls and activations (the peer: bf16 autocast or not)")
  p.add_argument("--param-dtype", default="float32", choices=("bfloat16", "float32"))
  p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
  p.add_argument("--fused-projections", default="auto", choices=FUSED_PROJECTIONS,
                 help="model.fused_projections: q/k/v and gate/up each as one matmul "
                 "(auto: on a GPU without tensor parallelism)")
  p.add_argument("--scan-unroll", type=int, default=0,
                 help="model.scan_unroll: layers per iteration of the layer scan (default 0: "
                 "auto, every layer unrolled with --remat none up to 32 layers, else 1, a "
                 "rolled loop; the layer count unrolls it fully, compile time then grows "
                 "with depth)")
  p.add_argument("--loss-chunk", type=int, default=0,
                 help="model.loss_chunk: time steps per vocab chunk of the loss "
                 "(default 0 = losses.DEFAULT_CHUNK_SIZE)")
  p.add_argument("--packed-lengths", type=_lengths_arg, metavar="DIST",
                 help="pack examples of lengths drawn from DIST: sft or fixed:N (module doc)")
  p.add_argument("--lora-rank", type=int, default=16,
                 help="LoRA/DoRA rank (alpha = 2 x rank, as r=16/alpha=32), both sides")
  p.add_argument("--lora-targets", type=lambda s: [t.strip() for t in s.split(",")],
                 metavar="NAME,...", help="LoRA/DoRA targets, both sides (default all-linear; "
                 "names as stage.peft.targets, e.g. q_proj,v_proj or expert_gate_up,expert_down)")
  p.add_argument("--mesh", type=sharding_lib.mesh_arg, metavar="AXIS=N,...",
                 help="shard the step over every device as the trainer's config.mesh does, "
                 "e.g. fsdp=8 or data=2,fsdp=4 (default: one device); --batch is global")
  p.add_argument("--peer", choices=PEERS, help="also run the PyTorch peer (tools/hf_peer.py)")
  p.add_argument("--peer-compile", action="store_true",
                 help="the peer uses torch.compile (the same as --peer hf-compile)")
  p.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of a few steps")
  p.add_argument("--profile-steps", type=int, default=3)
  p.add_argument("--compile-scaling", type=_layer_list, metavar="L1,L2,...",
                 help="only compile (from abstract shapes, nothing allocated; with --mesh, "
                 "sharded) at each layer count: compile time (last/first) and memory per device")
  p.add_argument("--target", metavar="h100|h200|a100|FILE[:N]",
                 help="with --compile-scaling: compile for N (default 1) of that GPU on this "
                 "host, no GPU needed (jaxsft.aot; FILE: a target config from `python -m "
                 "jaxsft.aot --write-config`); memory per device against what JAX may use there")
  p.add_argument("--repeats", type=int, default=1,
                 help="compiles per layer count in --compile-scaling; the fastest is reported")
  p.add_argument("--peak-tflops", type=float,
                 help="device peak for MFU (default: from metrics.PEAK_TFLOPS)")
  p.add_argument("--skip-memory-check", action="store_true",
                 help="run even if the memory estimate exceeds what is available")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--moe-dispatch", default="auto", choices=MOE_DISPATCHES,
                 help="MoE shapes: how tokens reach experts (models/mixtral.py)")
  p.add_argument("--moe-capacity-factor", type=float, default=2.0,
                 help="MoE shapes, bucketed dispatch: bucket rows per expert as a multiple "
                      "of an even share of the routed tokens")
  args = p.parse_args(argv)
  if args.compile_scaling and args.layers:
    p.error("--layers and --compile-scaling both set the layer count; give one")
  if args.compile_scaling and (args.peer or args.packed_lengths):
    p.error("--compile-scaling only compiles jaxsft's step on unpacked rows; drop --peer and "
            "--packed-lengths")
  if args.target and not args.compile_scaling:
    p.error("--target compiles for a GPU that is not here, it cannot run steps: add "
            "--compile-scaling LAYERS (e.g. the shape's own layer count)")
  for name in ("seq_len", "batch", "steps", "repeats", "profile_steps"):
    if getattr(args, name) <= 0:
      p.error(f"--{name.replace('_', '-')} must be positive")
  if args.scan_unroll < 0:
    p.error("--scan-unroll must be 0 (auto) or more")
  if args.warmup < 0:
    p.error("--warmup must be 0 or more")
  if args.mesh and args.peer:
    p.error("--peer runs on one device; compare against it without --mesh")
  if args.lora_rank <= 0:
    p.error("--lora-rank must be positive")
  if args.lora_targets:
    try:
      peft_methods.lora_targets(args.lora_targets, "--lora-targets")
    except ValueError as e:
      p.error(str(e))
  adapter_options = args.lora_targets or args.lora_rank != p.get_default("lora_rank")
  if adapter_options and args.method in ("full", "freeze"):
    p.error(f"--lora-rank/--lora-targets set adapters; method {args.method} trains none "
            f"(use lora, dora or full_then_lora)")
  if args.quantization and args.method != "lora":
    p.error(f"--quantization {args.quantization} is QLoRA: it needs --method lora, "
            f"not {args.method}")
  if args.loss_chunk < 0:
    p.error("--loss-chunk must be 0 (the default) or more")
  if args.layers is not None and args.layers <= 0:
    p.error("--layers must be positive")
  context = SHAPES[args.shape].max_position_embeddings
  if args.seq_len > context:
    p.error(f"--seq-len {args.seq_len} exceeds the context of shape {args.shape!r} "
            f"({context} tokens, max_position_embeddings)")
  if args.peer_compile and not args.peer:
    p.error("--peer-compile needs --peer hf (or use --peer hf-compile)")
  if args.peer and args.method not in ("full", "lora", "dora"):
    p.error(f"--peer {args.peer} runs the methods full, lora and dora (PEFT); not {args.method}")
  if args.packed_lengths and parse_lengths(args.packed_lengths)[1] > args.seq_len:
    p.error(f"--packed-lengths {args.packed_lengths}: examples longer than --seq-len "
            f"{args.seq_len} do not fit a row; ask for at most {args.seq_len} tokens")
  if args.profile and pathlib.Path(args.profile).exists() and not pathlib.Path(
      args.profile).is_dir():
    p.error(f"--profile {args.profile} exists and is not a directory; the trace is a directory")
  if args.target:
    try:
      aot.target_config(aot.parse(args.target)[0])
    except ValueError as e:
      p.error(f"--target: {e}")
  if args.quantization:
    _check_quantizable(p, args)
  return args


def _check_quantizable(p: argparse.ArgumentParser, args) -> None:
  """``p.error`` unless every projection QLoRA stores of ``--shape`` splits
  into 4-bit blocks (``nf4.store``'s own check, on one abstract layer), before
  any peer or step runs."""
  abstract = llama.abstract_params(SHAPES[args.shape].replace(num_layers=1))
  try:
    nf4.store(abstract, jax.tree.map(lambda _: False, abstract), double_quant=True)
  except ValueError as e:
    p.error(f"--quantization {args.quantization} on shape {args.shape!r}: {e}; pick another "
            "--shape")


def _print_table(result: dict) -> None:
  rows = result.pop("compile_scaling", None)
  width = max(len(k) for k in result)
  for key, value in result.items():
    if isinstance(value, float):
      value = f"{value:.4g}"
    print(f"{key:<{width}}  {value}")
  if rows:
    result["compile_scaling"] = rows
    print(f"\n{'layers':>6}  {'lower_s':>8}  {'compile_s':>9}  {'total_s':>8}  {'vs first':>8}"
          f"  {'cpu_s':>7}  {'vs first':>8}  {'GiB/device':>10}  {'limit GiB':>9}  fits")
    gib = lambda b: "?" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    for r in rows:
      print(f"{r['layers']:>6}  {r['lower_s']:>8.2f}  {r['compile_s']:>9.2f}  "
            f"{r['total_s']:>8.2f}  {r['total_s'] / rows[0]['total_s']:>7.2f}x"
            f"  {r['cpu_s']:>7.2f}  {r['cpu_s'] / rows[0]['cpu_s']:>7.2f}x"
            f"  {gib(r['memory_bytes_per_device']):>10}  {gib(r['device_bytes_limit']):>9}"
            f"  {'?' if r['fits'] is None else ('yes' if r['fits'] else 'NO')}")


def model_config(args) -> ModelConfig:
  cfg = SHAPES[args.shape].replace(dtype=args.dtype, param_dtype=args.param_dtype,
                                   remat=args.remat, attention=args.attention,
                                   fused_projections=args.fused_projections,
                                   scan_unroll=args.scan_unroll, loss_chunk=args.loss_chunk)
  if cfg.is_moe:
    cfg = cfg.replace(moe_dispatch=args.moe_dispatch,
                      moe_capacity_factor=args.moe_capacity_factor)
  return cfg.replace(num_layers=args.layers) if args.layers else cfg


def make_data(cfg: ModelConfig, args) -> tuple[dict, dict | None]:
  """(rows [steps, B, T] per field, the packed examples or None), on the host."""
  n_batches = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
  if args.packed_lengths:
    return packed_batches(cfg, args.packed_lengths, n_batches, args.batch, args.seq_len,
                          args.seed)
  return row_batches(cfg, n_batches, args.batch, args.seq_len, args.seed), None


def main(argv=None) -> dict:
  args = parse_args(argv)
  host_memory.reuse_freed_memory()  # CPU-only hosts: no page faults per step
  cfg = model_config(args)
  result = {
      "shape": args.shape,
      "method": args.method,
      "quantization": args.quantization,
      "layers": None if args.compile_scaling else cfg.num_layers,
      "batch": args.batch,
      "seq_len": args.seq_len,
      "packed_lengths": args.packed_lengths,
      "dtype": args.dtype,
      "param_dtype": args.param_dtype,
      "remat": args.remat,
      # As run (auto resolved); compiles at several depths report the setting.
      "scan_unroll": args.scan_unroll if args.compile_scaling else cfg.layer_unroll,
      "loss_chunk": args.loss_chunk or losses.DEFAULT_CHUNK_SIZE,
      "fused_projections": args.fused_projections,
      "moe_dispatch": mixtral.resolve_dispatch(cfg) if cfg.is_moe else None,
  }
  if args.compile_scaling:
    result.update(_platform(args.target))
    result.update(run_compile_scaling(cfg, args))
  else:
    # Host data first, then the peer, and only then JAX's backend (module doc).
    rows, examples = make_data(cfg, args)
    if examples is not None:
      result["examples"] = len(examples["ex_lengths"])
      result["mean_example_len"] = float(np.mean(examples["ex_lengths"]))
    peer = run_peer(cfg, args, rows, examples) if args.peer else None
    result.update(_platform())
    result.update(run_steps(cfg, args, rows, examples))
    if peer is not None:
      result.update({f"peer_{k}": peer[k] for k in (
          "tokens_per_s", "nonpad_tokens_per_s", "step_s", "peak_mem_gib", "peak_memory_source",
          "compile_s", "loss", "device", "torch_version", "transformers_version", "compiled",
          "frozen_dtype", "trainable_params")})
      result["ratio"] = result["tokens_per_s"] / peer["tokens_per_s"]
      result["nonpad_ratio"] = result["nonpad_tokens_per_s"] / peer["nonpad_tokens_per_s"]
  _print_table(result)
  print(json.dumps(result))
  return result


def _platform(target: str | None = None) -> dict:
  if target:  # compile only, for that GPU: this host's devices are beside the point
    return {"backend": "gpu (compile-only)", "device": aot.label(target),
            "jax_version": jax.__version__}
  device = jax.devices()[0]
  return {"backend": device.platform, "device": device.device_kind,
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
          "jax_version": jax.__version__}


def measure_real_compiles() -> None:
  """Turn JAX's persistent compilation cache off for this process (the CLIs
  call it first): with ``JAX_COMPILATION_CACHE_DIR`` set, ``compile_s`` would
  otherwise time loading an earlier run's executable, not compiling."""
  jax.config.update("jax_enable_compilation_cache", False)


if __name__ == "__main__":
  measure_real_compiles()
  try:
    main()
  except ValueError as e:  # bad input found past the argument checks
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
