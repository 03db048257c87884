"""Write a synthetic SFT dataset (JSON Lines) for benchmarks and demos.

    python tools/make_synthetic_sft.py --out /tmp/sft.jsonl --samples 100000 [--seed 0]
        [--format messages|alpaca]

Words are made of syllables and drawn from a Zipf distribution (so a BPE
tokenizer trained on them splits them roughly as it splits English, about 1.3
tokens a word); one message in ten is Chinese instead. Lengths are long-tailed
like real SFT data: instructions of ~5–100 words, answers of ~10–800 (median
~100), a quarter of the samples with 2–3 turns, a fifth with a system prompt.
Nothing here is committed data: generate it where it is needed.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def vocabulary(rng: np.random.Generator, size: int = 20_000) -> list[str]:
  """``size`` distinct pseudo-words of 1–4 syllables."""
  words: set[str] = set()
  while len(words) < size:
    n = int(rng.integers(1, 5))
    words.add("".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), n)))
  return sorted(words)


class Writer:
  """Sentences from a Zipf-weighted vocabulary."""

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)
    self.words = np.array(vocabulary(self.rng))
    self.rng.shuffle(self.words)  # frequency rank unrelated to spelling
    p = 1.0 / np.arange(1, len(self.words) + 1) ** 1.1
    self.cdf = np.cumsum(p / p.sum())

  def text(self, median_words: float, sigma: float = 0.9, cap: int = 1200) -> str:
    n = int(min(cap, max(3, self.rng.lognormal(np.log(median_words), sigma))))
    if self.rng.random() < 0.1:  # Chinese: clauses of 5–25 characters
      chars = self.rng.choice(CJK, n)
      cuts = np.cumsum(self.rng.integers(5, 26, n // 5 + 1))
      clauses = ["".join(chars[a:b]) for a, b in zip(np.r_[0, cuts], cuts) if a < n]
      return "，".join(clauses) + "。"
    # Inverse-CDF sampling: rng.choice(p=...) rebuilds the CDF on every call.
    words = self.words[np.minimum(np.searchsorted(self.cdf, self.rng.random(n)),
                                  len(self.words) - 1)]
    out, start = [], 0
    while start < n:  # sentences of 5–20 words
      stop = start + int(self.rng.integers(5, 21))
      sentence = " ".join(words[start:stop])
      out.append(sentence[:1].upper() + sentence[1:] + ".")
      start = stop
    return " ".join(out)


def sample(w: Writer, fmt: str) -> dict:
  turns = int(w.rng.choice([1, 2, 3], p=[0.75, 0.17, 0.08]))
  system = w.text(15, 0.5) if w.rng.random() < 0.2 else None
  exchanges = [(w.text(20), w.text(100)) for _ in range(turns)]
  if fmt == "alpaca":
    row = {"instruction": exchanges[-1][0], "output": exchanges[-1][1]}
    if w.rng.random() < 0.1:
      row["input"] = w.text(30)
    if system:
      row["system"] = system
    if turns > 1:
      row["history"] = [list(e) for e in exchanges[:-1]]
    return row
  messages = [{"role": "system", "content": system}] if system else []
  for user, assistant in exchanges:
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
  return {"messages": messages}


def write(path: str, samples: int, seed: int = 0, fmt: str = "messages") -> None:
  """Write ``samples`` rows to ``path``."""
  w = Writer(seed)
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(samples):
      f.write(json.dumps(sample(w, fmt), ensure_ascii=False) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--samples", type=int, default=100_000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--format", choices=("messages", "alpaca"), default="messages")
  args = parser.parse_args()
  write(args.out, args.samples, args.seed, args.format)


if __name__ == "__main__":
  main()
