"""Evaluate a model on a data file; prints a summary, then, last, one JSON line.

    python -m jaxsft.evaluate --model PATH --data FILE [--metric loss|json-labels|accuracy]
        [--format F] [--chat] [--system TEXT] [--template T] [--batch-size N]
        [--max-new-tokens N] [--max-length N] [--predictions OUT.jsonl]
        [--train-data FILE] [--dtype D] [--mesh AXIS=N,...] [--trust-remote-code]

PATH is a Hugging Face model directory or a jaxsft checkpoint.

``--metric loss`` (default). With ``--format text`` (default) every line of
FILE is a JSON object with a "text" string, tokenized as ``tokenizer(text)``
and scored on every next-token prediction inside the row. With a data format
(auto, alpaca, sharegpt, messages, label; ``jaxsft.data.formats``) rows are
rendered by ``--template`` (default: the tokenizer's chat template) with
``--system`` for rows without a system message, and only the answer tokens
are scored: the answer-only loss SFT trains. The last line is
``{"loss": <mean loss per scored token>, "tokens": <scored tokens>}``, the
mean taken over all rows' tokens together (not a mean of row means).

``--metric json-labels``: generative classification. Each row is a chat whose
last assistant answer is the reference JSON object (or a label row, whose
reference is ``{"labels": [...]}``, as SFT on label rows trains it). The
model answers the conversation before that answer — rendered by the template
with ``--chat`` (system message: the row's, else ``--system``), else the last
user message as plain text — greedily, in batches, over the KV cache
(``generate.generate``). The first balanced ``{...}`` in the answer that
parses as JSON is the prediction (code fences and surrounding text are
fine); no such object is a parse failure. Comparison is field by field
(``compare``): nested objects by path (``a.b``), lists as sets of labels,
scalars by equality. Prints a per-field table; the last line holds
exact_match, micro_f1, macro_f1 (over the labels ``field=value``),
per_field_accuracy, parse_failure_rate and examples. ``--train-data``
(the training file) makes labels that never occur in it be reported.

``--metric accuracy``: a classification model (a cls stage's checkpoint or
its *ForSequenceClassification export) on label rows: each text is scored
as ``tokenizer(text)`` and predicted as the argmax label (every label whose
sigmoid passes 0.5 for a multi-label model). Reported as json-labels reports
``{"labels": [...]}``, plus accuracy (= exact match) and the labels of the
data that the model does not have (``unseen_labels``: counted wrong, not an
error).

A prompt- or P-tuned checkpoint reads every row after its virtual tokens
(so a row's first token is predicted too, as PEFT scores it), a prefix-tuned
one with its key/value prefixes, for every metric, as in training and in
``jaxsft.generate``; they take the first positions of the context.

``--predictions OUT.jsonl`` writes one line per example (source, prompt,
generation, prediction, reference, correct fields) for error analysis.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import pathlib
import re
import sys
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import generate
from jaxsft import losses
from jaxsft import sharding as sharding_lib
from jaxsft.data import formats as data_formats
from jaxsft.data import sources as data_sources
from jaxsft.data import templates as data_templates
from jaxsft.models import heads
from jaxsft.models import llama
from jaxsft.models.model_config import ModelConfig
from jaxsft.peft import prompts as prompts_lib

METRICS = ("loss", "json-labels", "accuracy")
FORMATS = ("text", "auto", "alpaca", "sharegpt", "messages", "label")
DEFAULT_MAX_NEW_TOKENS = 128
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
  if path.is_dir():
    raise ValueError(f"data file {path} is a directory; --format text reads one JSON Lines file "
                     "of {\"text\": ...} rows")
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
def _batch_loss(cfg: ModelConfig, params, tokens, segment_ids, loss_mask):
  """(loss_sum, token_count) of next-token prediction on right-padded rows,
  on the target tokens ``loss_mask`` marks."""
  # Padding gets position 0 rather than its column: positions are an input to
  # RoPE (dynamic NTK scales with the largest one), and padding must not move them.
  columns = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  positions = jnp.where(segment_ids != 0, columns, 0)
  hidden, _ = llama.hidden_states(cfg, params, tokens, positions, segment_ids)
  targets, weights = losses.next_token_targets(tokens, segment_ids, loss_mask)
  w, vocab_major = llama.output_projection(cfg, params)
  return losses.masked_cross_entropy(hidden, w, targets, weights, vocab_major=vocab_major)


def virtual_ids(cfg: ModelConfig) -> list[int]:
  """The ids of a prompt-tuned (or P-tuned) model's virtual tokens, which stand
  before every sequence it reads (as ``generate.generate`` puts them); []
  for other models. Prefix tuning's key/value prefixes need no ids: the model
  adds them in every attention layer by itself."""
  n = cfg.adapters.virtual_tokens if cfg.adapters is not None else 0
  return prompts_lib.virtual_ids(n).tolist() if n else []


def usable_context(cfg: ModelConfig) -> int:
  """The positions left to a sequence: prompt/P-tuning's virtual tokens and
  prefix tuning's prefixes take the first ones."""
  a = cfg.adapters
  return cfg.max_position_embeddings - ((a.virtual_tokens or a.prefix_tokens) if a else 0)


def token_loss(cfg: ModelConfig, params, rows: Sequence[Sequence[int]],
               batch_size: int = DEFAULT_BATCH_SIZE,
               masks: Sequence[Sequence[int]] | None = None) -> tuple[float, int]:
  """(summed next-token loss, predicted-token count) over ``rows`` of token ids.

  Rows are scored independently (each its own segment, right-padded), sorted
  by length so that batches carry little padding. ``masks`` (per row, aligned
  with it) limit the scored targets, e.g. to the answers of a chat. A
  prompt-tuned model's virtual tokens stand before every row (``virtual_ids``),
  as in training and in PEFT: the row's first token is then predicted too.
  """
  pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  virtual = virtual_ids(cfg)
  if virtual:
    masks = [[0] * len(virtual) + list(m) for m in (masks or [[1] * len(r) for r in rows])]
    rows = [virtual + list(r) for r in rows]
  order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
  total, count = 0.0, 0
  for start in range(0, len(order), batch_size):
    batch = [rows[i] for i in order[start:start + batch_size]]
    length = _padded_length(max(len(r) for r in batch))
    tokens = np.full((batch_size, length), pad_id, np.int32)
    segment_ids = np.zeros((batch_size, length), np.int32)
    loss_mask = np.zeros((batch_size, length), np.int32)
    for i, k in enumerate(order[start:start + batch_size]):
      row = rows[k]
      tokens[i, :len(row)] = row
      segment_ids[i, :len(row)] = 1
      loss_mask[i, :len(row)] = 1 if masks is None else masks[k]
    loss_sum, n = _batch_loss(cfg, params, jnp.asarray(tokens), jnp.asarray(segment_ids),
                              jnp.asarray(loss_mask))
    total += float(loss_sum)
    count += int(n)
  return total, count


# ----------------------------------------------------------------------------- JSON answers

def _fence_free(text: str) -> str:
  """``text`` with Markdown code-fence lines (```json … ```) removed."""
  return "\n".join(line for line in text.splitlines() if not line.strip().startswith("```"))


def extract_json(text: str) -> dict | None:
  """The first balanced ``{...}`` of ``text`` that parses as a JSON object
  (code fences and text around it are fine), or None."""
  text = _fence_free(text)
  start = text.find("{")
  while start != -1:
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
      ch = text[i]
      if in_string:
        if escaped:
          escaped = False
        elif ch == "\\":
          escaped = True
        elif ch == '"':
          in_string = False
      elif ch == '"':
        in_string = True
      elif ch == "{":
        depth += 1
      elif ch == "}":
        depth -= 1
        if depth == 0:
          try:
            value = json.loads(text[start:i + 1])
          except json.JSONDecodeError:
            break
          if isinstance(value, dict):
            return value
          break
    start = text.find("{", start + 1)
  return None


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
  """Field path -> value: nested objects by dotted path; lists and scalars are leaves."""
  if isinstance(obj, Mapping) and (obj or not prefix):
    out = {}
    for k, v in obj.items():
      out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: obj}


def _labels(value: Any) -> set[str]:
  """A field value as a set of labels: a list's items, else the value itself."""
  items = value if isinstance(value, list) else [value]
  return {json.dumps(x, sort_keys=True, ensure_ascii=False) if not isinstance(x, str) else x
          for x in items}


@dataclasses.dataclass
class Comparison:
  """One prediction against its reference (``compare``)."""
  exact: bool
  fields: dict[str, bool]  # reference field path -> predicted right
  counts: dict[str, list[int]]  # label "field=value" -> [tp, fp, fn]


def compare(prediction: Mapping | None, reference: Mapping) -> Comparison:
  """Field-by-field comparison. Lists are label sets (order and repeats do not
  matter); every field's labels count as ``field=label`` for F1; a field is
  right when its set of labels equals the reference's. ``prediction`` None (a
  parse failure) gets every field wrong, every reference label missed."""
  ref = _flatten(reference)
  pred = _flatten(prediction) if prediction is not None else {}
  fields, counts = {}, collections.defaultdict(lambda: [0, 0, 0])
  for path in sorted(set(ref) | set(pred)):
    want = _labels(ref[path]) if path in ref else set()
    got = _labels(pred[path]) if path in pred else set()
    if path in ref:
      fields[path] = path in pred and want == got
    for label in want & got:
      counts[f"{path}={label}"][0] += 1
    for label in got - want:
      counts[f"{path}={label}"][1] += 1
    for label in want - got:
      counts[f"{path}={label}"][2] += 1
  exact = prediction is not None and set(pred) == set(ref) and all(fields.values())
  return Comparison(exact, fields, dict(counts))


def _f1(tp: int, fp: int, fn: int) -> float:
  return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def summarize(comparisons: Sequence[Comparison], parse_failures: int) -> dict[str, Any]:
  """exact_match, micro_f1, macro_f1 (mean over labels seen in references or
  predictions), per_field_accuracy (over the examples whose reference has the
  field), parse_failure_rate and examples."""
  n = len(comparisons)
  totals = collections.defaultdict(lambda: [0, 0, 0])
  field_right, field_seen = collections.Counter(), collections.Counter()
  for c in comparisons:
    for label, (tp, fp, fn) in c.counts.items():
      t = totals[label]
      t[0], t[1], t[2] = t[0] + tp, t[1] + fp, t[2] + fn
    for path, ok in c.fields.items():
      field_seen[path] += 1
      field_right[path] += ok
  tp, fp, fn = (sum(t[i] for t in totals.values()) for i in range(3))
  return {
      "exact_match": sum(c.exact for c in comparisons) / n if n else 0.0,
      "micro_f1": _f1(tp, fp, fn),
      "macro_f1": float(np.mean([_f1(*t) for t in totals.values()])) if totals else 0.0,
      "per_field_accuracy": {p: field_right[p] / field_seen[p] for p in sorted(field_seen)},
      "parse_failure_rate": parse_failures / n if n else 0.0,
      "examples": n,
  }


def known_labels(references: Iterable[Mapping]) -> set[str]:
  """Every ``field=label`` of ``references`` (e.g. of the training data)."""
  out = set()
  for ref in references:
    for path, value in _flatten(ref).items():
      out.update(f"{path}={label}" for label in _labels(value))
  return out


def unseen_labels(references: Iterable[Mapping], known: set[str]) -> dict[str, int]:
  """Reference labels outside ``known``, with how many examples carry each."""
  counts = collections.Counter()
  for ref in references:
    for path, value in _flatten(ref).items():
      counts.update(f"{path}={l}" for l in _labels(value) if f"{path}={l}" not in known)
  return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------- examples

@dataclasses.dataclass
class Example:
  """One evaluation example: the prompt messages, the reference object, its row."""
  prompt: list[data_formats.Message]
  reference: dict
  source: str


def json_examples(conversations: Sequence[data_formats.Conversation]) -> list[Example]:
  """Prompts and reference objects of chats (the last assistant answer is the
  reference) and label rows (``{"labels": [...]}``)."""
  out = []
  for conv in conversations:
    if conv.kind == "label":
      out.append(Example(list(conv.messages), {"labels": list(conv.labels)}, conv.source))
      continue
    if conv.kind != "chat":
      raise ValueError(f"{conv.source}: a {conv.kind} row; --metric json-labels needs chats "
                       "whose last assistant answer is the reference JSON, or label rows")
    last = max((i for i, m in enumerate(conv.messages) if m.role == "assistant"), default=None)
    if last is None:
      raise ValueError(f"{conv.source}: no assistant answer to take the reference JSON from")
    reference = extract_json(conv.messages[last].content)
    if reference is None:
      raise ValueError(f"{conv.source}: the reference answer is not a JSON object: "
                       f"{conv.messages[last].content[:80]!r}")
    out.append(Example(list(conv.messages[:last]), reference, conv.source))
  return out


def prompt_ids(example: Example, tokenizer, template) -> list[int]:
  """The prompt of ``example``: rendered by ``template`` with the generation
  prompt, or (``template`` None) the last user message as plain text."""
  if template is not None:
    return template.prompt_ids(example.prompt, tokenizer)
  return list(tokenizer(example.prompt[-1].content)["input_ids"])


def generate_texts(cfg: ModelConfig, params, tokenizer, prompts: Sequence[Sequence[int]],
                   max_new_tokens: int, batch_size: int,
                   stop_ids: Sequence[int] | None = None) -> list[str]:
  """Greedy answers to ``prompts``, ``batch_size`` at a time (similar lengths
  together), decoded without special tokens."""
  eos = sorted(set(cfg.eos_token_ids) | set(stop_ids or ()))
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  texts: list[str] = [""] * len(prompts)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    new = generate.generate(cfg, params, [prompts[i] for i in chunk], max_new_tokens,
                            eos_token_ids=eos)
    for i, ids in zip(chunk, new):
      texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
  return texts


def json_label_eval(cfg: ModelConfig, params, tokenizer, examples: Sequence[Example], *,
                    template=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    batch_size: int = DEFAULT_BATCH_SIZE, known: set[str] | None = None
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(summary, per-example records) of generating answers to ``examples``
  and comparing the JSON in them with the references (module doc)."""
  if cfg.has_head:
    raise ValueError(f"the model is a {cfg.problem_type} model (a score head, no lm_head): it "
                     "does not generate; use --metric accuracy")
  prompts = [prompt_ids(e, tokenizer, template) for e in examples]
  context = usable_context(cfg)
  for e, p in zip(examples, prompts):
    if len(p) + max_new_tokens > context:
      raise ValueError(f"{e.source}: the prompt ({len(p)} tokens) plus max_new_tokens="
                       f"{max_new_tokens} exceeds the model's context of {context} tokens; "
                       "lower --max-new-tokens or shorten the row")
  stop = template.stop_ids(tokenizer) if template is not None else None
  texts = generate_texts(cfg, params, tokenizer, prompts, max_new_tokens, batch_size, stop)
  comparisons, records, failures = [], [], 0
  for e, text in zip(examples, texts):
    pred = extract_json(text)
    failures += pred is None
    c = compare(pred, e.reference)
    comparisons.append(c)
    records.append({"source": e.source, "prompt": e.prompt[-1].content, "generation": text,
                    "prediction": pred, "reference": e.reference, "exact_match": c.exact,
                    "parse_failure": pred is None, "fields": c.fields})
  summary = summarize(comparisons, failures)
  if known is not None:
    summary["unseen_labels"] = unseen_labels((e.reference for e in examples), known)
  return summary, records


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sequence_logits(cfg, params, tokens, mask):
  return heads.sequence_logits(cfg, params, tokens, mask)


def classifier_logits(cfg: ModelConfig, params, rows: Sequence[Sequence[int]],
                      batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """fp32 scores [N, C] of a head model for ``rows`` of token ids, each read
  alone (after a prompt-tuned model's virtual tokens), ``batch_size`` at a
  time, right-padded, similar lengths together."""
  virtual = virtual_ids(cfg)
  rows = [virtual + list(r) for r in rows]
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
  out = np.zeros((len(rows), cfg.num_labels), np.float32)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    length = _padded_length(max(len(rows[i]) for i in chunk), 16)
    tokens = np.full((batch_size, length), pad, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for j, i in enumerate(chunk):
      tokens[j, :len(rows[i])], mask[j, :len(rows[i])] = rows[i], 1
    logits = np.asarray(_sequence_logits(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
    out[chunk] = logits[:len(chunk)]
  return out


def classifier_eval(cfg: ModelConfig, params, tokenizer, conversations, batch_size: int,
                    max_length: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(summary, records) of a classification model on label rows (module doc)."""
  if not cfg.has_head or cfg.problem_type == "regression":
    raise ValueError("--metric accuracy needs a classification model (a cls stage's checkpoint "
                     "or a *ForSequenceClassification directory); this one is "
                     f"{cfg.problem_type or 'a causal LM'}")
  for conv in conversations:
    if conv.kind != "label":
      raise ValueError(f"{conv.source}: a {conv.kind} row; --metric accuracy needs label rows "
                       "(text + label/labels)")
  names = cfg.label_names or tuple(f"LABEL_{i}" for i in range(cfg.num_labels))
  rows = []
  for conv in conversations:
    ids = list(tokenizer(conv.text)["input_ids"])[:max_length or None]
    if not ids:
      raise ValueError(f"{conv.source}: the text is empty (no tokens)")
    if len(ids) > usable_context(cfg):
      raise ValueError(f"{conv.source}: {len(ids)} tokens, more than the model's context of "
                       f"{usable_context(cfg)}; pass --max-length to truncate")
    rows.append(ids)
  predicted = heads.predictions(cfg, classifier_logits(cfg, params, rows, batch_size))
  comparisons, records = [], []
  for conv, ids in zip(conversations, predicted):
    pred = {"labels": [names[i] for i in ids]}
    c = compare(pred, {"labels": list(conv.labels)})
    comparisons.append(c)
    records.append({"source": conv.source, "text": conv.text, "prediction": pred["labels"],
                    "reference": list(conv.labels), "exact_match": c.exact})
  summary = summarize(comparisons, 0)
  summary["accuracy"] = summary["exact_match"]
  summary["unseen_labels"] = unseen_labels(({"labels": list(c.labels)} for c in conversations),
                                           {f"labels={n}" for n in names})
  return summary, records


def read_examples(path, fmt: str = "auto", system: str | None = None):
  """The rows of a data file as conversations (``jaxsft.data.sources``); a
  file without rows is an error naming it."""
  if not pathlib.Path(path).exists():
    raise ValueError(f"data file {path} does not exist")
  try:
    return data_sources.load_examples({"path": str(path), "format": fmt, "system_prompt": system})
  except ValueError as e:
    # A run config maps a file's fields with columns=; this CLI has no such option.
    raise ValueError(re.sub(r"; map it with columns=\{.*\}$",
                            "; give the --format the rows are in (or auto)", str(e))) from None


def _print_table(summary: dict[str, Any]) -> None:
  fields = summary["per_field_accuracy"]
  if not fields:
    return
  width = max(len("field"), *(len(f) for f in fields))
  print(f"{'field':<{width}}  accuracy")
  for f, acc in fields.items():
    print(f"{f:<{width}}  {acc:8.1%}")


def _non_finite(params) -> str:
  """Which parameters hold NaN or infinity, for an error message."""
  bad = ["/".join(sharding_lib.path_names(path))
         for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
         if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
         and not bool(jnp.isfinite(x).all())]
  if not bad:
    return "its weights are all finite: the overflow is in the computation; try --dtype float32"
  return f"NaN or infinity in {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}"


def write_predictions(path, records) -> None:
  """``records`` as JSON lines at ``path`` (parents created)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m jaxsft.evaluate", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True,
                      help="Hugging Face model directory or jaxsft checkpoint")
  parser.add_argument("--data", required=True, help="data file (JSONL, JSON, parquet, CSV)")
  parser.add_argument("--metric", default="loss", help=f"one of {METRICS} (default loss)")
  parser.add_argument("--format", default=None,
                      help=f"one of {FORMATS}; default: text for --metric loss, else auto")
  parser.add_argument("--chat", action="store_true",
                      help="json-labels: render prompts with the chat template")
  parser.add_argument("--system", default=None,
                      help="system message for rows without one (chat formats)")
  parser.add_argument("--template", default="tokenizer",
                      help="chat template: tokenizer (its own), chatml, qwen2, llama3, mistral")
  parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
  parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                      help=f"json-labels: answer length budget (default {DEFAULT_MAX_NEW_TOKENS})")
  parser.add_argument("--max-length", type=int, default=None,
                      help="truncate each row to this many tokens")
  parser.add_argument("--predictions", default=None,
                      help="write per-example predictions to this JSONL file")
  parser.add_argument("--train-data", default=None,
                      help="json-labels: the training file, to report labels it never has")
  parser.add_argument("--dtype", choices=generate.DTYPES, default="auto",
                      help="compute dtype (auto: a checkpoint's own; a Hugging Face model's "
                           "stored dtype on GPU/TPU, float32 on CPU); on GPU/TPU the weights "
                           "are read in it too")
  generate.add_mesh_argument(parser)
  generate.add_quantization_argument(parser)
  parser.add_argument("--trust-remote-code", action="store_true",
                      help="allow custom tokenizer code shipped with the model")
  return parser.parse_args(argv)


def _check_args(args) -> None:
  if args.metric not in METRICS:
    raise ValueError(f"--metric {args.metric!r} is not one of {', '.join(METRICS)}")
  if args.format is None:
    args.format = "text" if args.metric == "loss" else "auto"
  if args.format not in FORMATS:
    raise ValueError(f"--format {args.format!r} is not supported; supported: "
                     f"{', '.join(FORMATS)}")
  if args.metric != "loss" and args.format == "text":
    raise ValueError(f"--metric {args.metric} needs labelled rows, not --format text")
  if args.batch_size < 1:
    raise ValueError(f"--batch-size={args.batch_size} must be at least 1")
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
  if args.max_length is not None and args.max_length < 2:
    raise ValueError(f"--max-length={args.max_length} must be at least 2 (one token "
                     "predicts the next)")
  if args.system is not None and args.format == "text":
    raise ValueError("--system needs a chat format: --format text has no prompt to put it in")
  if args.system is not None and args.metric == "json-labels" and not args.chat:
    raise ValueError("--system needs --chat (a system message only exists in a conversation)")
  if args.predictions is not None:
    out = pathlib.Path(args.predictions)
    if out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents):
      raise ValueError(f"--predictions {out} must be a file path (e.g. OUT.jsonl) whose parent "
                       "directories are directories")


def _loss_rows(args, tokenizer, context: int):
  """(token rows, masks or None, row count) to score for --metric loss."""
  if args.format == "text":
    rows = read_text_rows(args.data)
    return tokenize_rows(tokenizer, rows, args.data, context, args.max_length), None, len(rows)
  conversations = read_examples(args.data, args.format, args.system)
  template = data_templates.get_template(args.template, tokenizer)
  ids, masks = [], []
  for conv in conversations:
    if conv.kind == "pairwise":
      raise ValueError(f"{conv.source}: a pairwise row has two answers; --metric loss scores "
                       "one (use chat, alpaca, label or text rows)")
    enc = data_templates.encode(conv, template, tokenizer, max_length=args.max_length,
                                truncation="keep_answer")
    if enc is None:
      continue  # a chat without an answer, or one whose answer alone is too long
    if len(enc.input_ids) > context:
      raise ValueError(f"{conv.source}: the row is {len(enc.input_ids)} tokens, longer than the "
                       f"model's context of {context} tokens (max_position_embeddings); pass "
                       f"--max-length {context} (or less) to shorten prompts")
    ids.append(enc.input_ids)
    masks.append(enc.loss_mask)
  return ids, masks, len(conversations)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    _check_args(args)
    # Read the data first: a bad file should fail before the model loads.
    if args.metric == "loss" and args.format == "text":
      read_text_rows(args.data)
    else:
      conversations = read_examples(args.data, args.format,
                                    args.system if args.metric != "json-labels" or args.chat
                                    else None)
    mesh = generate.inference_mesh(args.mesh)
    cfg, params, tokenizer = generate.load_for_inference(args.model, args.trust_remote_code,
                                                         args.dtype, mesh=mesh,
                                                         quantization=args.quantization)
    with generate.on_mesh(mesh):
      context = usable_context(cfg)
      if args.max_length is not None and args.max_length > context:
        raise ValueError(f"--max-length={args.max_length} exceeds the model's context of "
                         f"{context} tokens (max_position_embeddings)")
      if args.metric == "loss":
        if cfg.has_head:
          raise ValueError(f"the model is a {cfg.problem_type} model with no lm_head: it has no "
                           "token loss; use --metric accuracy")
        token_rows, masks, n_rows = _loss_rows(args, tokenizer, context)
        total, count = token_loss(cfg, params, token_rows, args.batch_size, masks)
        if count == 0:
          raise ValueError(f"{args.data}: no row has two or more tokens, so there is nothing to "
                           "predict")
        if not np.isfinite(total):
          raise ValueError(f"the loss is {total / count}: the model computes non-finite values "
                           f"({_non_finite(params)})")
      elif args.metric == "json-labels":
        known = None
        if args.train_data is not None:
          known = known_labels(e.reference for e in json_examples(
              read_examples(args.train_data, args.format)))
        template = data_templates.get_template(args.template, tokenizer) if args.chat else None
        summary, records = json_label_eval(
            cfg, params, tokenizer, json_examples(conversations), template=template,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, known=known)
      else:
        summary, records = classifier_eval(cfg, params, tokenizer, conversations,
                                           args.batch_size, args.max_length)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.metric == "loss":
    loss = total / count
    print(f"{args.data}: {n_rows} rows, {count} predicted tokens")
    unscored = n_rows - sum(len(r) >= 2 for r in token_rows)
    if unscored:
      print(f"{unscored} of the rows score nothing (fewer than 2 tokens, or a chat without "
            "an answer)")
    print(f"loss {loss:.6f}  perplexity {float(np.exp(min(loss, 700.0))):.4g}")
    print(json.dumps({"loss": loss, "tokens": count}))
    return 0
  if args.predictions:
    write_predictions(args.predictions, records)
  _print_table(summary)
  print(f"{args.data}: {summary['examples']} examples, exact match {summary['exact_match']:.1%}, "
        f"micro-F1 {summary['micro_f1']:.3f}, macro-F1 {summary['macro_f1']:.3f}, "
        f"parse failures {summary['parse_failure_rate']:.1%}")
  if summary.get("unseen_labels"):
    unseen = summary["unseen_labels"]
    print(f"{len(unseen)} label(s) of the data were never seen in training (always wrong): "
          + ", ".join(f"{k} ({v})" for k, v in unseen.items()))
  print(json.dumps(summary, ensure_ascii=False))
  return 0


if __name__ == "__main__":
  sys.exit(main())
