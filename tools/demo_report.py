"""What `make demo` prints after training: where things are, the loss, samples.

    python tools/demo_report.py [RUN_DIR]      (default runs/demo)

Loads the run's Hugging Face export with jaxsft's own loader, answers a few
held-out prompts with the chat template the model was trained with, and
scores the intent task (JSON labels) by exact match on its held-out split.
"""
from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import demo  # noqa: E402  (configs/demo.py: the system prompts)

from jaxsft import generate  # noqa: E402

HELD_OUT = 100  # intent test utterances scored (the split has more)


def _chat_ids(tokenizer, system: str, prompt: str) -> list[int]:
  return generate.prompt_tokens(tokenizer, prompt, chat=True, system=system)


def main() -> None:
  run = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "runs" / "demo")
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  print(f"\nrun directory {run}")
  for name in ("metrics.jsonl", "loss.png", "config.json", "stages", "hf"):
    print(f"  {name:<14} {run / name}")
  for stage in dict.fromkeys(r["stage"] for r in rows):
    train = [r["loss"] for r in rows if r["stage"] == stage and r["split"] == "train"]
    evals = [r["loss"] for r in rows if r["stage"] == stage and r["split"] == "eval"]
    line = f"  stage {stage}: train loss {train[0]:.3f} -> {train[-1]:.3f}"
    if evals:
      line += f", eval loss {evals[0]:.3f} -> {evals[-1]:.3f}"
    print(line)

  cfg, params, tokenizer = generate.load_for_inference(run / "hf")
  samples = [(demo.SUPPORT, "What does error E203 mean?"),
             (demo.GENERAL, "What is 12 plus 7?")]
  test = [json.loads(l) for l in (demo.DATA / "intent_test.jsonl").read_text().splitlines()]
  test = test[:HELD_OUT]
  prompts = [_chat_ids(tokenizer, s, p) for s, p in samples]
  prompts += [_chat_ids(tokenizer, demo.INTENT, row["messages"][0]["content"]) for row in test]
  outputs = generate.generate(cfg, params, prompts, max_new_tokens=48)
  texts = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]

  print("\nsample generations (python -m jaxsft.generate --model RUN/hf --chat ...):")
  for (system, prompt), text in zip(samples, texts):
    print(f"  [{system}]\n  user: {prompt}\n  model: {text}")
  first = test[0]["messages"][0]["content"]
  print(f"  [{demo.INTENT}]\n  user: {first}\n  model: {texts[len(samples)]}")

  exact = parsed = 0
  for row, text in zip(test, texts[len(samples):]):
    want = json.loads(row["messages"][1]["content"])
    try:
      got = json.loads(text)
    except json.JSONDecodeError:
      continue
    parsed += 1
    exact += got == want
  print(f"\nintent task, {len(test)} held-out messages: exact match {exact / len(test):.1%}, "
        f"valid JSON {parsed / len(test):.1%}")
  print(json.dumps({"intent_exact_match": exact / len(test),
                    "intent_json_parse_rate": parsed / len(test),
                    "final_loss": {s: [r["loss"] for r in rows if r["stage"] == s and
                                       r["split"] == "train"][-1]
                                   for s in dict.fromkeys(r["stage"] for r in rows)}}))


if __name__ == "__main__":
  main()
