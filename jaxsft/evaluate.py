"""Evaluate a model on a data file; prints a short summary, then one JSON line.

    python -m jaxsft.evaluate --model PATH --data FILE.jsonl --format text
        [--batch-size N] [--max-length N] [--trust-remote-code]

``--format text``: every line of FILE is a JSON object with a "text" string.
Each row is tokenized as ``tokenizer(text)`` and scored on every next-token
prediction inside the row; the last line printed is
``{"loss": <mean loss per predicted token>, "tokens": <predicted tokens>}``,
the mean taken over all rows' tokens together (not a mean of row means).
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import generate
from jaxsft import losses
from jaxsft.models import llama
from jaxsft.models.model_config import ModelConfig

FORMATS = ("text",)
DEFAULT_BATCH_SIZE = 8


def _padded_length(n: int, minimum: int = 64) -> int:
  """Round a batch's length up to one of four sizes per power of two, so that
  batches of similar lengths share a compiled program (≤ 25% padding)."""
  if n <= minimum:
    return minimum
  step = max(minimum, 1 << (n.bit_length() - 3))
  return -(-n // step) * step


def read_text_rows(path) -> list[tuple[int, str]]:
  """(line number, text) of every non-blank line of a ``{"text": ...}`` JSONL file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"data file {path} does not exist")
  rows = []
  with path.open(encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        row = json.loads(line.rstrip("\r\n"))  # so error columns stay on this line
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                         "each line must be one JSON object") from None
      if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object like {{\"text\": \"...\"}}, "
                         f"got {type(row).__name__}")
      if "text" not in row:
        raise ValueError(f"{where}: no \"text\" key (keys: {sorted(row)}); --format text "
                         "needs {\"text\": \"...\"} on every line")
      if not isinstance(row["text"], str):
        raise ValueError(f"{where}: \"text\" must be a string, got "
                         f"{type(row['text']).__name__}")
      rows.append((line_no, row["text"]))
  if not rows:
    raise ValueError(f"data file {path} has no rows (it is empty or blank)")
  return rows


def tokenize_rows(tokenizer, rows, path, context: int, max_length: int | None) -> list[list[int]]:
  """Token ids of each row, truncated to ``max_length`` when given; a row longer
  than the model's context is an error naming its line."""
  out = []
  for line_no, text in rows:
    ids = list(tokenizer(text)["input_ids"])
    if max_length is not None:
      ids = ids[:max_length]
    elif len(ids) > context:
      raise ValueError(f"{path}:{line_no}: the row is {len(ids)} tokens, longer than the "
                       f"model's context of {context} tokens (max_position_embeddings); pass "
                       f"--max-length {context} (or less) to truncate rows")
    out.append(ids)
  return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batch_loss(cfg: ModelConfig, params, tokens, segment_ids):
  """(loss_sum, token_count) of next-token prediction on right-padded rows."""
  # Padding gets position 0 rather than its column: positions are an input to
  # RoPE (dynamic NTK scales with the largest one), and padding must not move them.
  columns = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  positions = jnp.where(segment_ids != 0, columns, 0)
  hidden, _ = llama.hidden_states(cfg, params, tokens, positions, segment_ids)
  targets, weights = losses.next_token_targets(tokens, segment_ids)
  return losses.masked_cross_entropy(hidden, llama.unembedding(cfg, params), targets, weights)


def token_loss(cfg: ModelConfig, params, rows: Sequence[Sequence[int]],
               batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[float, int]:
  """(summed next-token loss, predicted-token count) over ``rows`` of token ids.

  Rows are scored independently (each its own segment, right-padded), sorted
  by length so that batches carry little padding.
  """
  pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
  total, count = 0.0, 0
  for start in range(0, len(order), batch_size):
    batch = [rows[i] for i in order[start:start + batch_size]]
    length = _padded_length(max(len(r) for r in batch))
    tokens = np.full((batch_size, length), pad_id, np.int32)
    segment_ids = np.zeros((batch_size, length), np.int32)
    for i, row in enumerate(batch):
      tokens[i, :len(row)] = row
      segment_ids[i, :len(row)] = 1
    loss_sum, n = _batch_loss(cfg, params, jnp.asarray(tokens), jnp.asarray(segment_ids))
    total += float(loss_sum)
    count += int(n)
  return total, count


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m jaxsft.evaluate", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True,
                      help="Hugging Face model directory or jaxsft checkpoint")
  parser.add_argument("--data", required=True, help="JSONL file")
  parser.add_argument("--format", default="text", help=f"one of {FORMATS}")
  parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
  parser.add_argument("--max-length", type=int, default=None,
                      help="truncate each row to this many tokens")
  parser.add_argument("--trust-remote-code", action="store_true",
                      help="allow custom tokenizer code shipped with the model")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    if args.format not in FORMATS:
      raise ValueError(f"--format {args.format!r} is not supported; supported: "
                       f"{', '.join(FORMATS)}")
    if args.batch_size < 1:
      raise ValueError(f"--batch-size={args.batch_size} must be at least 1")
    if args.max_length is not None and args.max_length < 2:
      raise ValueError(f"--max-length={args.max_length} must be at least 2 (one token "
                       "predicts the next)")
    # Read the data first: a bad file should fail before the model loads.
    rows = read_text_rows(args.data)
    cfg, params, tokenizer = generate.load_for_inference(args.model, args.trust_remote_code)
    context = cfg.max_position_embeddings
    if args.max_length is not None and args.max_length > context:
      raise ValueError(f"--max-length={args.max_length} exceeds the model's context of "
                       f"{context} tokens (max_position_embeddings)")
    token_rows = tokenize_rows(tokenizer, rows, args.data, context, args.max_length)
    total, count = token_loss(cfg, params, token_rows, args.batch_size)
    if count == 0:
      raise ValueError(f"{args.data}: no row has two or more tokens, so there is nothing to "
                       "predict")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  loss = total / count
  print(f"{args.data}: {len(rows)} rows, {count} predicted tokens")
  print(f"loss {loss:.6f}  perplexity {float(np.exp(min(loss, 700.0))):.4g}")
  print(json.dumps({"loss": loss, "tokens": count}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
