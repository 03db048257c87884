"""Throughput of the data pipeline: read → render → tokenize → pack → batches.

    python tools/bench_data.py --data /tmp/sft.jsonl [--num-proc 1] [--seq-len 2048]
        [--batch-size 16] [--workdir DIR]

``--data`` is a JSON Lines SFT file (``tools/make_synthetic_sft.py`` writes
one; without ``--data`` a 100k-sample file is generated in the workdir). The
tokenizer is a 32k byte-level BPE with ChatML tokens trained on the first 10k
samples (no hub access needed), the template ChatML. Phases, each timed:

  read       parse the file into conversations (``sources.load_examples``)
  cold build ``pipeline.build`` with an empty cache: read + render + tokenize
             (``datasets.map``, ``--num-proc`` processes) + save + plan epoch 0
  batches    materialize every batch of epoch 0 (``Pipeline.batches``)
  warm build ``pipeline.build`` again: hash the file, memory-map the cache

Prints a table and, last, one JSON line. tokens/s counts the tokens of the
kept examples; "per core" divides by the processes tokenizing.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_synthetic_sft  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(data: str, out: str, vocab: int = 32_000, rows: int = 10_000):
  """A byte-level BPE trained on the first ``rows`` samples of ``data``."""
  import transformers  # noqa: PLC0415
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

  def texts():
    with open(data, encoding="utf-8") as f:
      for line in itertools.islice(f, rows):
        row = json.loads(line)
        for m in row.get("messages", []):
          yield m["content"]
        for k in ("instruction", "input", "output", "system"):
          if row.get(k):
            yield row[k]

  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts(), trainers.BpeTrainer(
      vocab_size=vocab, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
      additional_special_tokens=specials[1:])
  fast.chat_template = CHATML
  fast.save_pretrained(out)
  return fast


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                if line.startswith("Model name"))
  except (OSError, subprocess.CalledProcessError, StopIteration):
    return platform.processor() or "unknown"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data")
  parser.add_argument("--samples", type=int, default=100_000, help="when generating --data")
  parser.add_argument("--num-proc", type=int, default=1)
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  from jaxsft.data import pipeline, sources  # noqa: PLC0415

  work = args.workdir or tempfile.mkdtemp(prefix="jaxsft-data-bench-")
  os.makedirs(work, exist_ok=True)
  data = args.data or os.path.join(work, "sft.jsonl")
  if not os.path.exists(data):
    make_synthetic_sft.write(data, args.samples)
  tokenizer = build_tokenizer(data, os.path.join(work, "tokenizer"))
  cache = tempfile.mkdtemp(prefix="cache-", dir=work)  # cold: nothing cached
  cfg = dict(datasets=[dict(path=data)], template="chatml", num_proc=args.num_proc,
             cache_dir=cache)

  t = time.perf_counter()
  n_rows = len(sources.load_examples({"path": data}))
  read_s = time.perf_counter() - t

  t = time.perf_counter()
  pipe = pipeline.build(cfg, tokenizer, seq_len=args.seq_len)
  cold_s = time.perf_counter() - t
  stats = pipe.stats()

  t = time.perf_counter()
  batches = sum(1 for _ in pipe.batches(args.batch_size, epochs=1))
  batches_s = time.perf_counter() - t

  t = time.perf_counter()
  warm = pipeline.build(cfg, tokenizer, seq_len=args.seq_len)
  next(warm.batches(args.batch_size))
  warm_s = time.perf_counter() - t

  tokens = stats["tokens"]
  end_to_end = tokens / (cold_s + batches_s)
  result = {
      "samples": n_rows, "kept": stats["kept"], "tokens": tokens,
      "mean_tokens": round(tokens / max(1, stats["kept"]), 1), "seq_len": args.seq_len,
      "num_proc": args.num_proc, "read_s": round(read_s, 2), "cold_build_s": round(cold_s, 2),
      "batches_s": round(batches_s, 2), "warm_build_s": round(warm_s, 2),
      "packing_efficiency": round(stats["packing_efficiency"], 4),
      "tokens_per_s": round(end_to_end), "tokens_per_s_per_core": round(end_to_end / args.num_proc),
      "batch_tokens_per_s": round(batches * args.batch_size * args.seq_len / batches_s),
      "cpu": cpu_model(), "cores_visible": os.cpu_count(),
      "date": datetime.date.today().isoformat(),
  }
  width = max(len(k) for k in result)
  for k, v in result.items():
    print(f"{k:<{width}}  {v}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
