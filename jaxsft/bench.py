"""Benchmark CLI: speed, compile time and memory of one forward+backward step.

    python -m jaxsft.bench --shape tiny --seq-len 512 --batch 8 --steps 10
    python -m jaxsft.bench --shape llama3-8b --compile-scaling 2,32 --seq-len 128 --batch 1

Models are built from ``SHAPES`` (published architectures, random weights,
nothing downloaded). Prints a table and, last, one JSON line.

What one step is. ``jax.value_and_grad`` of the training loss, the masked
next-token cross-entropy (``losses.masked_cross_entropy``, vocab logits in
time chunks) plus, for MoE models, ``router_aux_loss_coef`` × the
load-balancing loss. There is no optimizer update yet, so step time and memory
leave out the optimizer state and its update; the batch has no padding, so
non-pad tokens/s equals tokens/s.

Modes.
  * Normal: build random weights, compile once (``compile_s`` = wall time of
    ``jit(step).lower(...).compile()``), run ``--warmup`` untimed steps, then
    ``--steps`` timed ones (``jax.block_until_ready`` on each); report the median
    step time. Shapes whose weights, gradients and activations would not fit
    the device (or, on CPU, host) memory by the estimate in ``memory_estimate``
    are refused; ``--layers`` shrinks them.
  * ``--compile-scaling 2,32``: for each layer count, lower and compile the
    step from ``jax.ShapeDtypeStruct`` inputs, so no weight is allocated and
    full-size shapes compile on a laptop. With the layers under ``nn.scan`` the
    compile time should barely grow with depth; the ratio last/first is printed.
    Depths are interleaved over ``--repeats`` and the fastest repeat is kept;
    the process CPU time (``cpu_s``) is reported beside the wall time because
    it is much less disturbed by other processes on a shared machine.

FLOPs (model FLOPs, as in MFU; recomputation is not counted), computed by
``jaxsft.metrics.train_flops`` (derivation there). Per step, with B·T tokens,
L layers, D width, N/K query/kv heads of size H, F ffn width, V vocab, E
experts of which k are active:

    flops = 6 · N_matmul · B·T  +  12 · L · B · P · N·H
    N_matmul = L·(2·D·N·H + 2·D·K·H + 3·D·F·k' + D·E) + D·V   (k' = k, or 1 if dense)
    P = Σ_t min(t+1, W) = T(T+1)/2 without a sliding window W

i.e. 6 FLOPs per matmul weight per token (2 forward, 4 backward; the embedding
lookup is a gather, norms and biases are left out) plus causal attention,
12·P·N·H ≈ 6·T²·N·H per layer and sequence for QKᵀ and PV, forward+backward.

Hardware FLOPs are higher than this: the XLA attention path computes all T²
scores and masks half, the chunked loss recomputes logits in the backward
pass, remat recomputes the forward, and MoE layers use the dense reference
dispatch (every expert sees every token: E/k× the expert FLOPs).

MFU = flops / step_s / peak, where peak is the dense bf16 tensor-core peak of
the device in ``metrics.PEAK_TFLOPS`` (vendor data sheets), or
``--peak-tflops``. MFU is null on CPU, for float32 compute (no single documented
peak: TF32 vs full fp32 depends on XLA flags), and for an unknown device.

Peak memory: ``device.memory_stats()["peak_bytes_in_use"]`` where the backend
reports it (GPU, TPU); otherwise the host process's max RSS
(``resource.getrusage``), which also counts Python, the compiler and the
random-weights initialization. The JSON says which (``peak_memory_source``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import losses, metrics
from jaxsft.models import llama, mixtral
from jaxsft.models.model_config import MOE_DISPATCHES, REMAT_POLICIES, ModelConfig

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


def memory_estimate(cfg: ModelConfig, batch: int, seq_len: int) -> int:
  """A rough upper estimate, in bytes, of what one fwd+bwd step holds.

  Weights and their gradients (param dtype), plus activations kept for the
  backward pass: per layer and token about 10·D + 4·F' values in the compute
  dtype (F' = E·F with the dense MoE dispatch) and the fp32 attention scores
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
  logits = 3 * batch * min(seq_len, losses.DEFAULT_CHUNK_SIZE) * cfg.vocab_size * 4
  weights = param_count(llama.abstract_params(cfg))
  return 2 * weights * p_bytes + activations + logits


def available_memory(device) -> tuple[int | None, str]:
  """Bytes the step may use, and where that figure comes from."""
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]), "device bytes_limit"
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
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  # ru_maxrss is KiB on Linux, bytes on macOS.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024), "host max RSS"


# ----------------------------------------------------------------------------- the step

def loss_fn(cfg: ModelConfig, params, tokens):
  """Mean next-token cross-entropy over ``tokens`` [B,T] (+ the MoE aux loss)."""
  hidden, aux = llama.hidden_states(cfg, params, tokens)
  targets, weights = losses.next_token_targets(tokens)
  loss_sum, count = losses.masked_cross_entropy(
      hidden, llama.unembedding(cfg, params), targets, weights)
  loss = loss_sum / jnp.maximum(count, 1.0)
  if cfg.is_moe:
    loss = loss + cfg.router_aux_loss_coef * aux["aux_loss"]
  return loss


def make_step(cfg: ModelConfig):
  """The jitted fwd+bwd: (params, tokens) -> (loss, grads). A fresh function per
  call, so nothing is reused from an earlier compile."""
  return jax.jit(jax.value_and_grad(lambda params, tokens: loss_fn(cfg, params, tokens)))


def abstract_inputs(cfg: ModelConfig, batch: int, seq_len: int):
  return llama.abstract_params(cfg), jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)


def compile_step(cfg: ModelConfig, batch: int, seq_len: int):
  """Lower and compile the step from abstract inputs.

  Returns (compiled, times) with wall-clock ``lower_s``, ``compile_s`` and
  ``cpu_s``, the process CPU time of both (all threads): on a shared machine
  other processes stretch the wall time, much less the CPU time.
  """
  params, tokens = abstract_inputs(cfg, batch, seq_len)
  c0, t0 = time.process_time(), time.perf_counter()
  lowered = make_step(cfg).lower(params, tokens)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1, "cpu_s": c2 - c0}


# ----------------------------------------------------------------------------- modes

def run_steps(cfg: ModelConfig, args) -> dict:
  device = jax.devices()[0]
  need = memory_estimate(cfg, args.batch, args.seq_len)
  have, have_source = available_memory(device)
  if have is not None and need > have and not args.skip_memory_check:
    raise SystemExit(
        f"shape {args.shape!r} with {cfg.num_layers} layers, batch {args.batch}, seq_len "
        f"{args.seq_len} needs about {need / 2**30:.1f} GiB (weights + gradients + activations; "
        f"see memory_estimate) but {have / 2**30:.1f} GiB is available ({have_source} on "
        f"{device.platform}). Shrink it with --layers N, a smaller --batch/--seq-len, "
        f"--param-dtype bfloat16 or --remat full; or measure compile time only with "
        f"--compile-scaling, which allocates no weights. --skip-memory-check overrides.")

  compiled, compile_times = compile_step(cfg, args.batch, args.seq_len)
  # Random weights, initialized under jit so the whole tree is built in one
  # program (eager init would hold every intermediate op's buffers).
  params = jax.jit(llama.init_params, static_argnums=0)(cfg, jax.random.key(args.seed))
  tokens = jax.random.randint(jax.random.key(args.seed + 1), (args.batch, args.seq_len), 0,
                              cfg.vocab_size, jnp.int32)
  jax.block_until_ready((params, tokens))

  for _ in range(args.warmup):
    jax.block_until_ready(compiled(params, tokens))
  times, loss = [], None
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss, grads = jax.block_until_ready(compiled(params, tokens))
    times.append(time.perf_counter() - t0)
    del grads
  step_s = statistics.median(times)

  tokens_per_step = args.batch * args.seq_len
  flops = metrics.train_flops(cfg, args.batch, args.seq_len)
  peak = args.peak_tflops or metrics.peak_tflops(device, args.dtype)
  mem, mem_source = peak_memory(device)
  return {
      "step": "fwd+bwd (no optimizer)",
      "params": param_count(params),
      "compile_s": compile_times["lower_s"] + compile_times["compile_s"],
      "lower_s": compile_times["lower_s"],
      "step_s": step_s,
      "step_s_min": min(times),
      "step_s_max": max(times),
      "tokens_per_s": tokens_per_step / step_s,
      "nonpad_tokens_per_s": tokens_per_step / step_s,
      "flops_per_step": flops,
      "tflops_per_s": flops / step_s / 1e12,
      "peak_tflops": peak,
      "mfu": None if peak is None else flops / step_s / (peak * 1e12),
      "peak_memory_bytes": mem,
      "peak_memory_source": mem_source,
      "memory_estimate_bytes": need,
      "loss": float(loss),
  }


def run_compile_scaling(cfg: ModelConfig, args) -> dict:
  depths = args.compile_scaling
  # One throwaway compile first, so one-time costs (backend start-up, lowering
  # rule registration) do not land on the first measured depth.
  compile_step(cfg.replace(num_layers=depths[0]), args.batch, args.seq_len)
  # Depths are interleaved across repeats so that a burst of load from other
  # processes hits all of them alike; the fastest repeat of each is reported,
  # since interference only ever adds time.
  runs: dict[int, list] = {layers: [] for layers in depths}
  for _ in range(args.repeats):
    for layers in depths:
      runs[layers].append(compile_step(cfg.replace(num_layers=layers), args.batch, args.seq_len))
  rows = []
  for layers in depths:
    compiled, best = min(runs[layers], key=lambda r: r[1]["lower_s"] + r[1]["compile_s"])
    mem = compiled.memory_analysis()
    rows.append({
        "layers": layers,
        "params": param_count(llama.abstract_params(cfg.replace(num_layers=layers))),
        **best,
        "total_s": best["lower_s"] + best["compile_s"],
        "cpu_s": min(t["cpu_s"] for _, t in runs[layers]),
        "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
    })
  return {
      "step": "fwd+bwd (no optimizer), compiled from abstract inputs",
      "compile_scaling": rows,
      "repeats": args.repeats,
      "compile_ratio": rows[-1]["total_s"] / rows[0]["total_s"],
      "compile_cpu_ratio": rows[-1]["cpu_s"] / rows[0]["cpu_s"],
  }


# ----------------------------------------------------------------------------- CLI

def _layer_list(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if len(values) < 2 or min(values) <= 0:
    raise argparse.ArgumentTypeError(
        f"--compile-scaling wants at least two positive layer counts like 2,32; got {text!r}")
  return values


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jaxsft.bench", description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  p.add_argument("--layers", type=int, help="override the shape's layer count")
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=10, help="timed steps (normal mode)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
  p.add_argument("--remat", default="none", choices=REMAT_POLICIES)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="compute dtype of matmuls and activations")
  p.add_argument("--param-dtype", default="float32", choices=("bfloat16", "float32"))
  p.add_argument("--compile-scaling", type=_layer_list, metavar="L1,L2,...",
                 help="only compile (from abstract shapes) at each layer count; print last/first")
  p.add_argument("--repeats", type=int, default=1,
                 help="compiles per layer count in --compile-scaling; the fastest is reported")
  p.add_argument("--peak-tflops", type=float,
                 help="device peak for MFU (default: from metrics.PEAK_TFLOPS)")
  p.add_argument("--skip-memory-check", action="store_true",
                 help="run even if the memory estimate exceeds what is available")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--moe-dispatch", default="auto", choices=MOE_DISPATCHES,
                 help="MoE shapes: how tokens reach experts (models/mixtral.py)")
  args = p.parse_args(argv)
  if args.compile_scaling and args.layers:
    p.error("--layers and --compile-scaling both set the layer count; give one")
  for name in ("seq_len", "batch", "steps", "repeats"):
    if getattr(args, name) <= 0:
      p.error(f"--{name.replace('_', '-')} must be positive")
  if args.layers is not None and args.layers <= 0:
    p.error("--layers must be positive")
  return args


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
          f"  {'cpu_s':>7}  {'vs first':>8}")
    for r in rows:
      print(f"{r['layers']:>6}  {r['lower_s']:>8.2f}  {r['compile_s']:>9.2f}  "
            f"{r['total_s']:>8.2f}  {r['total_s'] / rows[0]['total_s']:>7.2f}x"
            f"  {r['cpu_s']:>7.2f}  {r['cpu_s'] / rows[0]['cpu_s']:>7.2f}x")


def main(argv=None) -> dict:
  args = parse_args(argv)
  cfg = SHAPES[args.shape].replace(dtype=args.dtype, param_dtype=args.param_dtype,
                                   remat=args.remat, moe_dispatch=args.moe_dispatch)
  if args.layers:
    cfg = cfg.replace(num_layers=args.layers)
  device = jax.devices()[0]
  result = {
      "shape": args.shape,
      "layers": None if args.compile_scaling else cfg.num_layers,
      "batch": args.batch,
      "seq_len": args.seq_len,
      "dtype": args.dtype,
      "param_dtype": args.param_dtype,
      "remat": args.remat,
      "moe_dispatch": mixtral.resolve_dispatch(cfg) if cfg.is_moe else None,
      "backend": device.platform,
      "device": device.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__,
  }
  if args.compile_scaling:
    result.update(run_compile_scaling(cfg, args))
  else:
    result.update(run_steps(cfg, args))
  _print_table(result)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
