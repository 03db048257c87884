"""FLOP/MFU accounting, the metrics.jsonl writer, the loss plot and the progress bar.

Model FLOPs of one training step over B·T tokens (L layers, D width, N/K
query/kv heads of size H, F ffn width, V vocab, E experts of which k are
active):

    flops = (6 · N_train + 4 · N_frozen) · tokens  +  12 · L · P · N·H

  * ``N_matmul`` = L·(2·D·N·H + 2·D·K·H + 3·D·F·k' + D·E) + D·V: the weights
    that take part in a matmul per token (q/o and k/v projections, the SwiGLU
    gate/up/down with k' active experts (1 when dense), the MoE router, the
    output projection). The embedding lookup is a gather; norms and biases are
    negligible. A matmul weight costs 2 FLOPs per token forward, and 4 backward:
    2 for the gradient of its input, 2 for its own gradient. A frozen weight
    (LoRA's base, freeze tuning's frozen layers) needs no gradient of its own,
    only the input gradient: 4 per token. So ``N_frozen`` are the frozen matmul
    weights and ``N_train`` the trainable ones plus any adapter weights applied
    per token (LoRA's A and B: 6 each per token).
  * ``P`` = Σ over sequences of Σ_t min(t+1, W): the (query, key) pairs a
    causal (sliding-window) mask keeps; QKᵀ and PV cost 2·2·P·N·H forward,
    ×3 with backward (activations always need their gradients). For packed
    rows the sequences are the examples, and ``tokens`` counts non-pad tokens
    only: padding is not useful work.

That is "matmul FLOPs ×3, causal attention halved" as in the PaLM appendix and
MaxText. Recomputation (remat, the chunked loss's backward) is not counted:
this is MFU, not hardware utilization. MFU = flops / step time / peak, with the
dense bf16 peak of the device from ``PEAK_TFLOPS``; None on CPU, in fp32, or
when unknown.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from jaxsft.models.model_config import ModelConfig

# Dense bf16 tensor-core peak, TFLOP/s, by a substring of ``device.device_kind``
# (first match wins, so more specific names come first). Sparsity excluded.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5 / HBM3
    ("H200", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("TPU v6", 918.0),  # Trillium (v6e, "TPU v6 lite")
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5", 459.0),  # v5p
    ("TPU v4", 275.0),
)


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token (active experts only)."""
  d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if cfg.is_moe:
    ffn = 3 * d * cfg.intermediate_size * cfg.num_experts_per_tok + d * cfg.num_experts
  else:
    ffn = 3 * d * cfg.intermediate_size
  per_layer = 2 * d * n * h + 2 * d * k * h + ffn
  # A task head (models/heads.py) scores only each sequence's last token: no per-token output.
  return cfg.num_layers * per_layer + (0 if cfg.has_head else d * cfg.vocab_size)


def attended_pairs(cfg: ModelConfig, seq_len) -> int:
  """(query, key) pairs of one sequence (or, for an array of lengths, of all of
  them) under the causal (and sliding-window) mask."""
  n = np.asarray(seq_len, np.int64)
  full = n * (n + 1) // 2
  w = cfg.sliding_window
  if w is not None:
    # Σ_t min(t+1, W): the first W queries see t+1 keys, the rest W each.
    full = np.where(n <= w, full, w * (w + 1) // 2 + (n - w) * w)
  return int(full.sum())


def matmul_weight_count(cfg: ModelConfig, path: tuple[str, ...], shape) -> float:
  """How many of one parameter's scalars multiply each token (0 for gathers,
  norms and biases; k/E of an expert tensor). Sums to ``matmul_params`` over
  the base model, and counts adapter matrices (e.g. LoRA factors) too."""
  name = path[-1]
  if name.startswith("scale_") or "_bias_" in name or "bias" == name:
    return 0.0
  size = float(np.prod(shape))
  if name == "embedding_vd":  # a lookup, unless it is also the output projection
    return size if cfg.tie_word_embeddings else 0.0
  if cfg.is_moe and path[-2:-1] == ("moe",) and name != "router_de":
    return size * cfg.num_experts_per_tok / cfg.num_experts
  return size


def train_flops(cfg: ModelConfig, batch: int, seq_len: int, *, frozen: float = 0,
                adapter: float = 0, lengths=None) -> float:
  """Model FLOPs of one training step (module doc).

  ``batch`` × ``seq_len`` rows of one sequence each, unless ``lengths`` gives
  the lengths of the examples packed into them (padding is then not counted).
  ``frozen``: matmul weights (of ``matmul_params``) that get no gradient;
  ``adapter``: extra per-token matmul weights that train (LoRA factors).
  """
  if lengths is None:
    lengths = np.full(batch, seq_len)
  tokens = int(np.sum(lengths))
  train = matmul_params(cfg) - frozen + adapter
  dense = (6 * train + 4 * frozen) * tokens
  attention = 12 * cfg.num_layers * attended_pairs(cfg, lengths) * cfg.num_heads * cfg.head_dim
  return float(dense + attention)


def peak_tflops(device, dtype: str) -> float | None:
  """The documented dense bf16 peak of ``device``; None on CPU, for fp32, or if unknown."""
  if device.platform == "cpu" or dtype != "bfloat16":
    return None
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device.device_kind.lower():
      return tflops
  return None


class MetricsWriter:
  """Appends rows to ``OUT/metrics.jsonl`` (and TensorBoard, if tensorboardX is
  installed) and redraws ``OUT/loss.png``. Only one process writes."""

  def __init__(self, out: pathlib.Path, enabled: bool = True):
    self.path = out / "metrics.jsonl"
    self.plot_path = out / "loss.png"
    self.enabled = enabled
    self._tb = None
    if enabled:
      try:
        import tensorboardX  # noqa: PLC0415  (optional)
        self._tb = tensorboardX.SummaryWriter(str(out / "tensorboard"))
      except ImportError:
        pass

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      prefix = f"{row['stage']}/{row.get('split', 'train')}"
      for key, value in row.items():
        if isinstance(value, (int, float)) and key != "step":
          self._tb.add_scalar(f"{prefix}/{key}", value, row["step"])
        elif key == "datasets":  # an eval row's per-dataset metrics
          for name, metrics in value.items():
            for k, v in metrics.items():
              if isinstance(v, (int, float)):
                self._tb.add_scalar(f"{prefix}/{name}/{k}", v, row["step"])

  def drop_after(self, stage: str, step: int) -> None:
    """Remove the rows of ``stage`` past ``step``: what a run killed after its
    last checkpoint logged, which the resumed run logs again (a restarted
    stage passes -1). Without this the file holds those steps twice, and
    anything summed over it (trained tokens) counts them twice."""
    if not self.enabled or not self.path.is_file():
      return
    rows = self.rows()
    kept = [r for r in rows if r.get("stage") != stage or r.get("step", 0) <= step]
    if len(kept) == len(rows):
      return
    tmp = self.path.with_name(self.path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(self.path)

  def rows(self) -> list[dict[str, Any]]:
    if not self.path.is_file():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

  def plot(self) -> None:
    """Train and eval loss per stage, stages laid end to end on one step axis;
    generative exact match and head accuracies, when logged, on a right axis."""
    if not self.enabled:
      return
    plot_loss(self.rows(), self.plot_path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def plot_loss(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
  import matplotlib  # noqa: PLC0415  (slow import, only when plotting)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
  scores = None  # a right-hand axis for accuracies, when any were logged
  offset, stages = 0, []
  for row in rows:
    if row["stage"] not in stages:
      stages.append(row["stage"])
  for i, stage in enumerate(stages):
    color = f"C{i}"
    last = 0
    for split, style in (("train", "-"), ("eval", "o--")):
      pts = [(r["step"], r["loss"]) for r in rows
             if r["stage"] == stage and r.get("split", "train") == split and r["loss"] is not None]
      if pts:
        steps, loss = zip(*pts)
        ax.plot([offset + s for s in steps], loss, style, color=color, label=f"{stage} {split}")
        last = max(last, max(steps))
    # Each eval dataset's own loss, when a stage has several (trainer.evaluate).
    datasets = [n for r in rows if r["stage"] == stage and r.get("split") == "eval"
                for n in r.get("datasets", {})]
    for j, dataset in enumerate(dict.fromkeys(datasets)):
      pts = [(r["step"], r["datasets"][dataset]["loss"]) for r in rows
             if r["stage"] == stage and r.get("split") == "eval"
             and r.get("datasets", {}).get(dataset, {}).get("loss") is not None]
      if pts:
        steps, loss = zip(*pts)
        ax.plot([offset + s for s in steps], loss, ":", marker="v^<>sdph"[j % 8], markersize=3,
                color=color, alpha=0.7, lw=1, label=f"{stage} eval {dataset}")
    # Generative exact match (stage.generate_eval) and head accuracies (eval rows).
    for split, key, style in (("generate", "exact_match", "s:"), ("eval", "accuracy", "^:"),
                              ("eval", "pairwise_accuracy", "^:")):
      pts = [(r["step"], r[key]) for r in rows if r["stage"] == stage
             and r.get("split") == split and r.get(key) is not None]
      if pts:
        scores = scores or ax.twinx()
        steps, values = zip(*pts)
        scores.plot([offset + s for s in steps], values, style, color=color,
                    label=f"{stage} {key.replace('_', ' ')}")
        last = max(last, max(steps))
    if i:
      ax.axvline(offset, color="grey", lw=0.5)
    offset += last
  ax.set_xlabel("step (stages end to end)")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  if scores is not None:
    scores.set_ylabel("exact match / accuracy")
    scores.set_ylim(0, 1)
    scores.legend(loc="upper right", fontsize="small")
  if stages:
    ax.legend(loc="upper left" if scores is not None else "best", fontsize="small")
  fig.tight_layout()
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp)
  plt.close(fig)
  tmp.replace(path)


class Progress:
  """A progress bar: stage, step/total, loss, lr, tokens/s and ETA (tqdm)."""

  def __init__(self, stage: str, total: int, start: int):
    from tqdm.auto import tqdm  # noqa: PLC0415
    self.bar = tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True,
                    unit="step", mininterval=1.0)

  def update(self, step: int, row: dict[str, Any]) -> None:
    self.bar.update(step - self.bar.n)
    self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                         tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)

  def close(self) -> None:
    self.bar.close()
