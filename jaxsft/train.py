"""Train: ``python -m jaxsft.train --config configs/NAME.py [--config.KEY=VALUE ...] [--plan]``.

Runs the config's stages in order into ``config.output_dir``; re-running the
same command resumes from the latest checkpoint. See ``jaxsft.config`` for the
keys and ``jaxsft.trainer`` for what a run directory holds.

``--plan`` trains nothing: it compiles every stage's step from the weights'
shapes (``jaxsft.trainer.plan``; no weight is read, nothing is written) and
prints, per stage, the memory one device needs for the state and for the
whole step against what it has; exit status 1 if a stage would not fit.
``--plan --target h100:8`` plans for eight H100s that are not here
(``jaxsft.aot``: compiled for that GPU on this host, no GPU needed).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a config file (get_config())",
                                          lock_config=False)
_PLAN = flags.DEFINE_bool("plan", False, "train nothing: compile each stage's step from the "
                          "weights' shapes and print the memory per device it needs")
_TARGET = flags.DEFINE_string("target", None, "with --plan: plan for GPUs that are not here, "
                              "NAME[:COUNT] (h100, h200, a100 or a target config file; "
                              "jaxsft.aot), e.g. h100:8; needs jax's CUDA plugin and cuDNN "
                              "installed, no GPU")


def _maybe_initialize_distributed() -> None:
  """Join a multi-process run when launched as one.

  Under SLURM (several tasks) and on TPU pods, ``jax.distributed.initialize()``
  finds its peers itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of
  process 0) with JAXSFT_NUM_PROCESSES and JAXSFT_PROCESS_ID on every process.
  """
  import jax  # noqa: PLC0415
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  explicit = "JAXSFT_NUM_PROCESSES" in os.environ
  if not (slurm or tpu_pod or explicit or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    return
  # CPU processes need a collectives backend to talk to each other (GPU and
  # TPU use NCCL / ICI); it is harmless elsewhere.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if explicit:
    kwargs = dict(num_processes=int(os.environ["JAXSFT_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAXSFT_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


def main(argv) -> None:
  del argv
  # orbax logs every save at INFO; keep jaxsft's own messages and others' warnings.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jaxsft").setLevel(logging.INFO)
  config = _CONFIG.value
  if config is None:
    print("error: --config is required, e.g. --config configs/demo.py", file=sys.stderr)
    sys.exit(2)
  from jaxsft import host_memory, trainer  # noqa: PLC0415  (after flags: a typo fails fast)
  _maybe_initialize_distributed()
  host_memory.reuse_freed_memory()  # CPU-only hosts: no page faults per step
  try:
    if _TARGET.value and not _PLAN.value:
      raise ValueError("--target plans for GPUs that are not here; it needs --plan")
    if _PLAN.value:
      rows = trainer.plan(config, target=_TARGET.value)
    else:
      out = trainer.train(config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _PLAN.value:
    import jax  # noqa: PLC0415
    problems = [r["problem"] for r in rows if r["problem"]]
    if jax.process_index() == 0:
      print(trainer.format_plan(rows))
      for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)
  print(f"done: {out}")


if __name__ == "__main__":
  from jaxsft import config as config_lib  # noqa: PLC0415
  app.run(main, flags_parser=config_lib.flags_parser(_CONFIG))
