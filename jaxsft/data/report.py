"""What a stage's data looks like: rendered examples, duplicates, diversity,
lengths, and (given a model) each sample's answer loss.

Sample quality is the first lever of SFT, and the usual defects are cheap to
find: the same sample many times (exact duplicates), templated near-copies
(MinHash), a narrow spread of instructions (distinct-n), lengths that the
packing or max_length will cut, and samples a model already finds trivial or
cannot make sense of (per-sample answer loss under ``--score-with``).

Figures are over the kept examples of the stage's training datasets, each
counted once (the mixture's repetitions and weights do not change them):

  exact_duplicates  examples whose whole text (every message, whitespace
                    collapsed) equals an earlier example's
  near_duplicates   further examples whose word 5-shingle Jaccard similarity
                    with an earlier example, estimated by 64-permutation
                    MinHash, is >= 0.8 (candidates by LSH: 16 bands of 4; each
                    candidate is compared with its bucket's first example)
  distinct_1/2      distinct unigrams / bigrams over all unigrams / bigrams of
                    the instructions (first user message); words are runs of
                    letters and digits, and each CJK character is a word
  length_p50/90/99  percentiles of the examples' token counts
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from jaxsft.data import packing, sources
from jaxsft.data.formats import Conversation

NUM_PERM, BANDS, SHINGLE, NEAR = 64, 16, 5, 0.8
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|\w+")
_MASK64 = (1 << 64) - 1
GREEN, RESET = "\033[32m", "\033[0m"


# ----------------------------------------------------------------------------- rendering

def render(tokenizer, ids: Sequence[int], mask: Sequence[int], color: bool = False) -> str:
  """The example's text with the trained tokens marked: ``[[…]]``, or green
  when ``color``. Special tokens are shown as they are."""
  ids, mask = list(ids), list(mask)
  out, start = [], 0
  for i in range(1, len(ids) + 1):
    if i == len(ids) or mask[i] != mask[start]:
      text = tokenizer.decode(ids[start:i], skip_special_tokens=False)
      if mask[start]:
        text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
      out.append(text)
      start = i
  return "".join(out)


# ----------------------------------------------------------------------------- text figures

def words(text: str) -> list[str]:
  """Lower-cased words (module doc)."""
  return _WORD.findall(text.lower())


def full_text(conv: Conversation) -> str:
  """Everything an example says, for duplicate detection."""
  if conv.kind == "text":
    return conv.text or ""
  parts = [f"{m.role}: {m.content}" for m in conv.messages]
  parts += [f"{k}: {v}" for k, v in (("chosen", conv.chosen), ("rejected", conv.rejected),
                                      ("labels", conv.labels)) if v]
  return "\n".join(parts)


def instruction(conv: Conversation) -> str | None:
  """The first user message (None for raw text)."""
  return next((m.content for m in conv.messages if m.role == "user"), None)


def exact_duplicates(texts: Sequence[str]) -> int:
  """How many texts equal an earlier one (whitespace collapsed)."""
  return len(texts) - len({" ".join(t.split()) for t in texts})


def minhash(texts: Sequence[str], num_perm: int = NUM_PERM, shingle: int = SHINGLE,
            seed: int = 0) -> np.ndarray:
  """MinHash signatures [len(texts), num_perm] (uint64) of word shingles.

  Words get ids in order of first appearance; a shingle's hash mixes its
  word ids; permutation k is the multiply-shift hash ``(a_k·x + b_k) >> 32``
  (a_k odd), all in numpy over every shingle of every text at once.
  """
  vocab: dict[str, int] = {}
  hashes, owners = [], []
  for t, text in enumerate(texts):
    ids = np.array([vocab.setdefault(w, len(vocab) + 1) for w in words(text)] or [0], np.uint64)
    n = max(1, len(ids) - shingle + 1)
    h = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
      for j in range(min(shingle, len(ids))):
        h = (h * np.uint64(0x100000001B3)) ^ ids[j:j + n]
    hashes.append(h)
    owners.append(np.full(n, t, np.int64))
  if not hashes:
    return np.zeros((0, num_perm), np.uint64)
  h = np.concatenate(hashes)
  starts = np.concatenate([[0], np.cumsum([len(x) for x in hashes])[:-1]])
  rng = np.random.default_rng(seed)
  a = rng.integers(1, 1 << 63, num_perm, dtype=np.uint64) | np.uint64(1)
  b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)
  sig = np.empty((len(texts), num_perm), np.uint64)
  with np.errstate(over="ignore"):
    for k in range(num_perm):
      sig[:, k] = np.minimum.reduceat((a[k] * h + b[k]) >> np.uint64(32), starts)
  return sig


def near_duplicates(sig: np.ndarray, bands: int = BANDS, threshold: float = NEAR,
                    exclude: np.ndarray | None = None) -> np.ndarray:
  """Mask of rows that near-duplicate an earlier row (module doc); rows in
  ``exclude`` (e.g. exact duplicates) are not counted."""
  n, k = sig.shape
  r = k // bands
  marked = np.zeros(n, bool)
  for band in range(bands):
    block = np.ascontiguousarray(sig[:, band * r:(band + 1) * r])
    keys = block.view(np.dtype((np.void, block.dtype.itemsize * r))).ravel()
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    first = np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]])
    head = order[np.maximum.accumulate(np.where(first, np.arange(n), 0))]
    cand = head != order
    if cand.any():
      sim = (sig[order[cand]] == sig[head[cand]]).mean(axis=1)
      marked[order[cand][sim >= threshold]] = True
  if exclude is not None:
    marked &= ~exclude
  return marked


def distinct_n(texts: Sequence[str], n: int) -> float | None:
  """Distinct n-grams / all n-grams over ``texts`` (None without any)."""
  seen, total = set(), 0
  for text in texts:
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    total += len(grams)
    seen.update(grams)
  return len(seen) / total if total else None


def _exact_mask(texts: Sequence[str]) -> np.ndarray:
  seen, out = set(), np.zeros(len(texts), bool)
  for i, t in enumerate(texts):
    key = " ".join(t.split())
    out[i] = key in seen
    seen.add(key)
  return out


# ----------------------------------------------------------------------------- the report

def kept_conversations(pipe) -> list[tuple[str, int, Conversation]]:
  """(dataset, kept index, conversation) of every kept training example,
  re-read from the sources (the token cache does not hold the text)."""
  out = []
  for part in pipe.datasets:
    convs = sources.load_examples(part.spec)
    out.extend((part.name, k, convs[int(row)]) for k, row in enumerate(part.rows))
  return out


def report(pipe, conversations: list[tuple[str, int, Conversation]] | None = None
           ) -> dict[str, Any]:
  """The figures of the module doc, with the pipeline's counts and packing."""
  stats = pipe.stats()
  conversations = kept_conversations(pipe) if conversations is None else conversations
  texts = [full_text(c) for _, _, c in conversations]
  exact = _exact_mask(texts)
  near = near_duplicates(minhash(texts), exclude=exact) if texts else np.zeros(0, bool)
  instructions = [s for s in (instruction(c) for _, _, c in conversations) if s is not None]
  lengths = np.concatenate([p.lengths for p in pipe.datasets])
  p50, p90, p99 = (int(x) for x in np.percentile(lengths, [50, 90, 99], method="higher"))
  return {
      "examples": stats["examples"], "kept": stats["kept"], "tokens": stats["tokens"],
      "trained_tokens": stats["trained_tokens"],
      "dropped_no_assistant": stats["dropped_no_assistant"],
      "dropped_too_long": stats["dropped_too_long"], "truncated": stats["truncated"],
      "packing_efficiency": round(stats["packing_efficiency"], 4),
      "epoch_examples": stats["epoch_examples"], "epoch_rows": stats["epoch_rows"],
      "eval_examples": stats["eval_examples"],
      "exact_duplicates": int(exact.sum()), "near_duplicates": int(near.sum()),
      "distinct_1": _round(distinct_n(instructions, 1)),
      "distinct_2": _round(distinct_n(instructions, 2)),
      "length_p50": p50, "length_p90": p90, "length_p99": p99,
      "length_max": int(lengths.max()), "length_mean": round(float(lengths.mean()), 1),
  }


def _round(x: float | None) -> float | None:
  return None if x is None else round(x, 4)


# ----------------------------------------------------------------------------- scoring

def _bucket(n: int, seq_len: int) -> int:
  """Row length for an example of n tokens: a power of two >= 32, at most
  seq_len, so a handful of shapes compile."""
  return min(seq_len, max(32, 1 << (n - 1).bit_length()))


def score(pipe, model_dir: str, batch_size: int = 8) -> list[dict[str, Any]]:
  """Each kept training example's mean answer loss under the model in
  ``model_dir`` (a Hugging Face directory or a jaxsft checkpoint, read as
  ``generate.load_for_inference`` reads it: on a GPU/TPU in its compute
  dtype): ``{"dataset", "source", "index", "loss", "trained_tokens"}`` per
  example, in dataset order.

  Examples run one per row (no packing), grouped by padded length;
  ``llama.hidden_states`` and ``losses.masked_cross_entropy`` give each row's
  loss sum and count, as training computes them.
  """
  import jax  # noqa: PLC0415  (the report without a model needs none of this)
  import jax.numpy as jnp  # noqa: PLC0415

  from jaxsft import generate, losses  # noqa: PLC0415
  from jaxsft.models import llama  # noqa: PLC0415

  cfg, params, _ = generate.load_for_inference(model_dir, tokenizer=False)
  if cfg.has_head:
    raise ValueError(f"--score-with {model_dir}: a {cfg.problem_type} model has a score head "
                     "and no lm_head, so it gives no answer loss; score with a language model")
  a = cfg.adapters
  if a is not None and (a.prompt_tokens or a.prefix_tokens):
    raise ValueError(f"--score-with {model_dir}: a prompt/prefix-tuned checkpoint needs its "
                     "virtual tokens before every row; score with its base model, or a "
                     "LoRA/full checkpoint")
  top = max(int(p.tokens.max(initial=0)) for p in pipe.datasets)
  if top >= cfg.vocab_size:
    raise ValueError(f"--score-with {model_dir}: the data has token id {top}, outside the model's "
                     f"vocabulary of {cfg.vocab_size}; score with a model of the same tokenizer")

  @jax.jit
  def row_losses(params, tokens, segment_ids, positions, loss_mask):
    hidden, _ = llama.hidden_states(cfg, params, tokens, positions, segment_ids)
    unembed = llama.unembedding(cfg, params)
    targets, weights = losses.next_token_targets(tokens, segment_ids, loss_mask)
    one = lambda h, t, w: losses.masked_cross_entropy(h[None], unembed, t[None], w[None])  # noqa: E731
    return jax.vmap(one)(hidden, targets, weights)

  items = [(d, k) for d, part in enumerate(pipe.datasets) for k in range(len(part))]
  by_bucket: dict[int, list[tuple[int, int]]] = {}
  for d, k in items:
    by_bucket.setdefault(_bucket(int(pipe.datasets[d].lengths[k]), pipe.seq_len), []).append((d, k))
  results: dict[tuple[int, int], tuple[float, float]] = {}
  for length, group in sorted(by_bucket.items()):
    for i in range(0, len(group), batch_size):
      chunk = group[i:i + batch_size]
      rows = [[j] for j in range(len(chunk))] + [[]] * (batch_size - len(chunk))
      arrays = packing.fill_rows(rows, lambda j: pipe.datasets[chunk[j][0]].example(chunk[j][1]),
                                 length, 0)
      sums, counts = row_losses(params, *(jnp.asarray(arrays[f]) for f in (
          "tokens", "segment_ids", "positions", "loss_mask")))
      for j, key in enumerate(chunk):
        results[key] = (float(sums[j]), float(counts[j]))
  out = []
  for d, k in items:
    s, n = results[(d, k)]
    part = pipe.datasets[d]
    out.append({"dataset": part.name, "source": part.source(k), "index": k,
                "loss": s / n if n else None, "trained_tokens": int(n)})
  return out


def score_summary(scores: list[dict[str, Any]], top: int = 5) -> dict[str, Any]:
  """Token-weighted mean answer loss, the median per-example loss, and the
  ``top`` highest-loss (worst) and lowest-loss (most trivial) examples."""
  scored = [s for s in scores if s["loss"] is not None]
  if not scored:
    return {"answer_loss": None}
  total = sum(s["loss"] * s["trained_tokens"] for s in scored)
  count = sum(s["trained_tokens"] for s in scored)
  ranked = sorted(scored, key=lambda s: s["loss"])
  brief = lambda s: {"source": s["source"], "dataset": s["dataset"],  # noqa: E731
                     "loss": round(s["loss"], 4), "trained_tokens": s["trained_tokens"]}
  return {"answer_loss": round(total / count, 4),
          "answer_loss_p50": round(float(np.median([s["loss"] for s in scored])), 4),
          "worst": [brief(s) for s in ranked[::-1][:top]],
          "most_trivial": [brief(s) for s in ranked[:top]]}
