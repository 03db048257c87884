"""Host memory and time of ``python -m jaxsft.export`` on a random checkpoint.

    python tools/export_memory.py --shape llama3.2-1b --method lora --dir /tmp/em \
        [--layers N] [--param-dtype float32|bfloat16] [--dtype bfloat16] [--checkout DIR]

Writes a jaxsft checkpoint of a ``jaxsft.bench`` shape (random weights, for
LoRA/DoRA every factor random too, so that merging does real work) under
``--dir`` unless one is there already, then runs the export command line on
it in a subprocess and prints, as one JSON line, the subprocess's peak
resident memory (``ru_maxrss``), its wall time and the sizes of the
checkpoint and the export. ``--checkout DIR`` runs the export of another
jaxsft checkout (e.g. an older commit in a ``git worktree``) on the same
checkpoint, for a before/after comparison on one machine.

The checkpoint is built in a subprocess of its own and this process imports
nothing heavy: a child's peak resident memory on Linux starts from its
parent's at the fork, so a parent holding the random weights (or just JAX)
would inflate the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

def random_checkpoint(path: pathlib.Path, shape: str, method: str, rank: int,
                      layers: int | None = None, param_dtype: str = "float32", seed: int = 0):
  """A checkpoint of ``shape`` (with ``layers`` layers, weights in
  ``param_dtype``) with random weights, and adapters for ``method``."""
  import jax
  import numpy as np

  from jaxsft import bench, checkpoint
  from jaxsft import config as config_lib
  from jaxsft.models import llama
  from jaxsft.peft import methods

  if shape not in bench.SHAPES:
    sys.exit(f"--shape {shape!r}: use one of {', '.join(bench.SHAPES)}")
  cfg = bench.SHAPES[shape].replace(param_dtype=param_dtype)
  if layers:
    cfg = cfg.replace(num_layers=layers)
  abstract = llama.abstract_params(cfg)
  if method != "full":
    stage = config_lib.stage(method=method, peft=dict(rank=rank, alpha=2.0 * rank))
    cfg, abstract = methods.prepare(cfg, abstract, stage, jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(a):  # a slice at a time: no fp32 copy of a whole stacked weight
    x = np.empty(a.shape, a.dtype)
    for i in range(a.shape[0]):
      x[i] = 0.02 * rng.standard_normal(a.shape[1:], np.float32)
    return x
  checkpoint.save_model(path, jax.tree.map(fill, abstract), cfg)


def _bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", default="llama3.2-1b", help="a jaxsft.bench shape")
  parser.add_argument("--method", default="lora", choices=("full", "lora", "dora"))
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--layers", type=int, help="fewer layers than the shape has")
  parser.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                      help="the checkpoint's weights")
  parser.add_argument("--dir", required=True, help="where the checkpoint and export go")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
  parser.add_argument("--checkout", help="run this jaxsft checkout's export instead")
  parser.add_argument("--keep", action="store_true", help="keep the export")
  parser.add_argument("--build-only", help=argparse.SUPPRESS)  # the checkpoint's subprocess
  args = parser.parse_args(argv)
  if args.build_only:
    random_checkpoint(pathlib.Path(args.build_only), args.shape, args.method, args.rank,
                      args.layers, args.param_dtype)
    return {}

  root = pathlib.Path(args.dir)
  ckpt = root / (f"{args.shape}_L{args.layers or 'all'}_{args.param_dtype}_{args.method}"
                 f"_r{args.rank}")
  if not (ckpt / "model_config.json").is_file():
    subprocess.run([sys.executable, __file__, "--dir", args.dir, "--shape", args.shape,
                    "--method", args.method, "--rank", str(args.rank),
                    "--param-dtype", args.param_dtype, "--build-only", str(ckpt)]
                   + (["--layers", str(args.layers)] if args.layers else []), check=True)
  out = root / "export"
  shutil.rmtree(out, ignore_errors=True)
  checkout = pathlib.Path(args.checkout or pathlib.Path(__file__).resolve().parents[1])
  env = dict(os.environ, PYTHONPATH=str(checkout))
  start = time.perf_counter()
  run = subprocess.run([sys.executable, "-m", "jaxsft.export", "--checkpoint", str(ckpt),
                        "--out", str(out), "--dtype", args.dtype], cwd=checkout, env=env,
                       capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if run.returncode != 0:
    sys.exit(f"export failed ({run.returncode}):\n{run.stderr[-3000:]}")
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
  result = {"shape": args.shape, "layers": args.layers, "param_dtype": args.param_dtype,
            "method": args.method, "rank": args.rank, "dtype": args.dtype,
            "checkout": str(checkout), "checkpoint_bytes": _bytes(ckpt),
            "export_bytes": _bytes(out), "peak_rss_bytes": peak, "seconds": round(seconds, 1)}
  if not args.keep:
    shutil.rmtree(out)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
