"""Does the load-balancing loss keep a Mixtral's experts balanced? Train the same
tiny Mixtral on the demo corpus with the router loss off and on, and tabulate
the per-layer expert token fractions from each run's metrics.jsonl.

    python tools/moe_balance.py [--steps 300] [--log-every 50] [--out runs/moe_balance]

Each run is ``python -m jaxsft.train``'s code path (``trainer.train``) on the
CPT stage of configs/demo.py with the model swapped for a tiny Mixtral (8
experts, top-2). With E experts and perfect balance every expert gets 1/E of a
layer's routing slots; ``expert_fraction_min/max`` in metrics.jsonl are the
smallest and largest fraction over all (layer, expert) pairs, so a layer whose
router collapses onto a few experts shows up even if other layers are even.
Prints a Markdown table (the one in docs/MOE.md) and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY_MIXTRAL = dict(
    family="mixtral", vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512, num_experts=8,
    num_experts_per_tok=2, bos_token_id=1, eos_token_ids=(4, 2), pad_token_id=0)


def run_config(out: pathlib.Path, coef: float, args):
  """configs/demo.py's CPT stage on a tiny Mixtral, router loss weight ``coef``."""
  spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  c = demo.get_config()
  c.output_dir = str(out)
  c.seed = args.seed
  c.model.init = dict(TINY_MIXTRAL)
  c.model.router_aux_loss_coef = coef
  c.export.hf = False
  del c.stages["sft"]
  s = c.stages.cpt
  s.update(steps=args.steps, lr=args.lr, batch_size=args.batch, seq_len=args.seq_len,
           log_every=args.log_every, eval_every=0, checkpoint_every=args.steps,
           warmup_ratio=0.02)
  s.data.eval_fraction = 0.0
  return c


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--log-every", type=int, default=50)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--coefs", default="0,0.02", help="router_aux_loss_coef values to compare")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(ROOT / "runs" / "moe_balance"))
  args = p.parse_args(argv)

  from jaxsft import trainer  # noqa: PLC0415  (after argument errors, before JAX work)

  coefs = [float(x) for x in args.coefs.split(",")]
  results = {}
  for coef in coefs:
    out = pathlib.Path(args.out) / f"aux_{coef:g}"
    shutil.rmtree(out, ignore_errors=True)
    trainer.train(run_config(out, coef, args))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results[coef] = [r for r in rows if r.get("split") == "train"]

  uniform = 1.0 / TINY_MIXTRAL["num_experts"]
  head = "| step | " + " | ".join(f"aux {c:g}: min / max fraction | loss" for c in coefs) + " |"
  print(f"\nper-layer expert token fractions (uniform = {uniform:.3f})\n")
  print(head)
  print("|---|" + "---|---|" * len(coefs))
  for i, row in enumerate(results[coefs[0]]):
    cells = []
    for c in coefs:
      r = results[c][i]
      cells.append(f"{r['expert_fraction_min']:.3f} / {r['expert_fraction_max']:.3f} | "
                   f"{r['loss']:.3f}")
    print(f"| {row['step']} | " + " | ".join(cells) + " |")
  summary = {f"aux_{c:g}": {k: results[c][-1][k] for k in
                            ("step", "loss", "aux_loss", "expert_fraction_min",
                             "expert_fraction_max", "expert_fractions")} for c in coefs}
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  sys.exit(main() and 0)
