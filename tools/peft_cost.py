"""What a PEFT method saves, from the compiled train step (XLA's own accounting).

    python tools/peft_cost.py --shape llama3.2-1b --method lora --rank 16

Compiles (never runs) the trainer's step for ``full`` and for ``--method`` on
abstract inputs, so a 1B shape costs only compile time on a CPU, and prints
XLA's cost analysis (FLOPs) of each step and the bytes of each optimizer state.

Counting. XLA's cost analysis counts a loop body once, whatever its trip
count, so the layers are fully unrolled (``ModelConfig.scan_unroll``) and the
sequence is one loss chunk (``losses.DEFAULT_CHUNK_SIZE`` tokens per row, the
batch making up the token count): then every layer and the whole loss are
counted. The optimizer state is the abstract state's leaves (Adam's moments
exist for trainable parameters only). For ``full_then_lora`` the figures are
those after the switch (the LoRA phase); before it the step is ``full``'s.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import bench, losses, optim, trainer
from jaxsft import config as config_lib
from jaxsft.models import llama
from jaxsft.peft import methods


def step_cost(cfg, method: str, rank: int, batch: int, seq_len: int) -> dict:
  """FLOPs (XLA) of one compiled train step and its optimizer-state bytes."""
  stage = config_lib.stage(method=method, lr=1e-5, warmup_steps=0, schedule="constant",
                           peft=dict(rank=rank, alpha=2.0 * rank))
  params = llama.abstract_params(cfg)
  cfg, params = methods.prepare(cfg, params, stage, jax.random.key(0), phase=1)
  tx, lr_fn = optim.build(stage, 10, params)
  mask = optim.trainable_mask(params, stage)
  state = jax.eval_shape(lambda p: trainer.init_state(p, tx, 0, mask), params)
  row = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  batch_struct = {k: row for k in trainer.BATCH_KEYS}
  compiled = jax.jit(trainer.make_train_step(cfg, tx, lr_fn, 1, mask)).lower(
      state, batch_struct).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  nbytes = lambda tree: int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize  # noqa: E731
                                for x in jax.tree_util.tree_leaves(tree)))
  trainable = int(sum(np.prod(x.shape) for x, m in zip(jax.tree_util.tree_leaves(params),
                                                        jax.tree_util.tree_leaves(mask)) if m))
  return {"flops": float(cost["flops"]), "opt_state_bytes": nbytes(state.opt_state),
          "param_bytes": nbytes(params), "trainable_params": trainable}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shape", default="llama3.2-1b", choices=sorted(bench.SHAPES))
  p.add_argument("--method", default="lora", choices=[m for m in methods.METHODS if m != "full"])
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--batch", type=int, default=16, help="rows of one loss chunk each")
  p.add_argument("--layers", type=int, help="fewer layers than the shape has")
  args = p.parse_args(argv)
  cfg = bench.SHAPES[args.shape].replace(dtype="bfloat16", param_dtype="float32")
  if args.layers:
    cfg = cfg.replace(num_layers=args.layers)
  cfg = cfg.replace(scan_unroll=cfg.num_layers)
  seq = losses.DEFAULT_CHUNK_SIZE
  full = step_cost(cfg, "full", args.rank, args.batch, seq)
  other = step_cost(cfg, args.method, args.rank, args.batch, seq)
  out = {"shape": args.shape, "layers": cfg.num_layers, "method": args.method, "rank": args.rank,
         "tokens_per_step": args.batch * seq,
         "full": full, args.method: other,
         "flops_ratio": other["flops"] / full["flops"],
         "opt_state_ratio": other["opt_state_bytes"] / full["opt_state_bytes"],
         "backend": jax.default_backend(), "jax_version": jax.__version__}
  for key in ("flops", "opt_state_bytes", "trainable_params"):
    print(f"{key:18s} full {full[key]:.4g}   {args.method} {other[key]:.4g}")
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
