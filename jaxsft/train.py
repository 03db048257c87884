"""Train: ``python -m jaxsft.train --config configs/NAME.py [--config.KEY=VALUE ...]``.

Runs the config's stages in order into ``config.output_dir``; re-running the
same command resumes from the latest checkpoint. See ``jaxsft.config`` for the
keys and ``jaxsft.trainer`` for what a run directory holds.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a config file (get_config())",
                                          lock_config=False)


def _maybe_initialize_distributed() -> None:
  """Join a multi-process run when launched as one (SLURM, TPU pods, or explicit env)."""
  import jax  # noqa: PLC0415
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("JAXSFT_DISTRIBUTED"):
    jax.distributed.initialize()


def main(argv) -> None:
  del argv
  # orbax logs every save at INFO; keep jaxsft's own messages and others' warnings.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jaxsft").setLevel(logging.INFO)
  config = _CONFIG.value
  if config is None:
    print("error: --config is required, e.g. --config configs/demo.py", file=sys.stderr)
    sys.exit(2)
  from jaxsft import trainer  # noqa: PLC0415  (after flags: a typo fails fast)
  _maybe_initialize_distributed()
  try:
    out = trainer.train(config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"done: {out}")


if __name__ == "__main__":
  app.run(main)
