"""What `make demo` prints after training: where things are, the loss, samples,
and the intent task solved both ways.

    python tools/demo_report.py [RUN_DIR [CLS_RUN_DIR]]    (default runs/demo, runs/demo_cls)

Loads the run's Hugging Face export with jaxsft's own loader, answers a few
prompts with the chat template the model was trained with, and scores the
intent task on its held-out split both ways, with the functions behind
``python -m jaxsft.evaluate``:

  generatively (configs/demo.py)  the SFT model answers each message with a
      JSON object; exact match of the whole object (lists compared as sets),
      micro-F1 over the labels, and the ``intents`` field alone
  with a classification head (configs/demo_cls.py, when it has run)  the
      multi-label head's predicted intent set against the reference set
"""
from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import demo  # noqa: E402  (configs/demo.py: the system prompts)

from jaxsft import evaluate, generate  # noqa: E402
from jaxsft.data import templates  # noqa: E402

INTENT_TEST = demo.DATA / "intent_test.jsonl"
INTENT_CLS_TEST = demo.DATA / "intent_cls_test.jsonl"


def _chat_ids(tokenizer, system: str, prompt: str) -> list[int]:
  return generate.prompt_tokens(tokenizer, prompt, chat=True, system=system)


def _losses(rows, indent="  "):
  for stage in dict.fromkeys(r["stage"] for r in rows):
    train = [r["loss"] for r in rows if r["stage"] == stage and r["split"] == "train"]
    evals = [r for r in rows if r["stage"] == stage and r["split"] == "eval"]
    line = f"{indent}stage {stage}: train loss {train[0]:.3f} -> {train[-1]:.3f}"
    if evals:
      line += f", eval loss {evals[0]['loss']:.3f} -> {evals[-1]['loss']:.3f}"
      if evals[-1].get("accuracy") is not None:
        line += f", eval accuracy {evals[-1]['accuracy']:.1%}"
      if evals[-1].get("datasets"):
        line += " (" + ", ".join(f"{name} {d['loss']:.3f}" for name, d in
                                 evals[-1]["datasets"].items() if d["loss"] is not None) + ")"
    generated = [r for r in rows if r["stage"] == stage and r["split"] == "generate"]
    if generated:
      line += ", intent exact match during training " + " -> ".join(
          f"{r['exact_match']:.0%} (step {r['step']})" for r in generated)
    print(line)


def main() -> None:
  run = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "runs" / "demo")
  cls_run = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else ROOT / "runs" / "demo_cls")
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  print(f"\nrun directory {run}")
  for name in ("metrics.jsonl", "loss.png", "config.json", "stages", "hf"):
    print(f"  {name:<14} {run / name}")
  _losses(rows)

  cfg, params, tokenizer = generate.load_for_inference(run / "hf")
  samples = [(demo.SUPPORT, "What does error E203 mean?"),
             (demo.GENERAL, "What is 12 plus 7?")]
  outputs = generate.generate(cfg, params, [_chat_ids(tokenizer, s, p) for s, p in samples],
                              max_new_tokens=48)
  print("\nsample generations (python -m jaxsft.generate --model RUN/hf --chat ...):")
  for (system, prompt), ids in zip(samples, outputs):
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    print(f"  [{system}]\n  user: {prompt}\n  model: {text}")

  # The intent task, generatively: what `jaxsft.evaluate --metric json-labels --chat` runs.
  examples = evaluate.json_examples(evaluate.read_examples(INTENT_TEST, system=demo.INTENT))
  summary, records = evaluate.json_label_eval(
      cfg, params, tokenizer, examples, template=templates.get_template("tokenizer", tokenizer),
      max_new_tokens=48, batch_size=50)
  print(f"  [{demo.INTENT}]\n  user: {records[0]['prompt']}\n  model: {records[0]['generation']}")
  print(f"\nintent task, {summary['examples']} held-out messages, generated JSON "
        f"(configs/demo.py):\n  exact match {summary['exact_match']:.1%}, micro-F1 "
        f"{summary['micro_f1']:.3f}, valid JSON {1 - summary['parse_failure_rate']:.1%}, "
        "per field " + ", ".join(f"{k} {v:.1%}" for k, v in
                                 summary["per_field_accuracy"].items()))
  print(f"  python -m jaxsft.evaluate --model {run / 'hf'} --data {INTENT_TEST} "
        f"--metric json-labels --chat --system '{demo.INTENT}'")
  result = {"intent_exact_match": summary["exact_match"],
            "intent_json_parse_rate": 1 - summary["parse_failure_rate"],
            "intent_micro_f1": summary["micro_f1"],
            "intents_field_accuracy": summary["per_field_accuracy"].get("intents")}

  if (cls_run / "hf").is_dir():
    cls_rows = [json.loads(l) for l in (cls_run / "metrics.jsonl").read_text().splitlines()]
    cfg, params, tokenizer = generate.load_for_inference(cls_run / "hf")
    cls_summary, _ = evaluate.classifier_eval(cfg, params, tokenizer,
                                              evaluate.read_examples(INTENT_CLS_TEST), 50)
    print(f"\nintent task, {cls_summary['examples']} held-out messages, classification head "
          f"(configs/demo_cls.py, {cfg.num_labels} labels, {cfg.problem_type}):")
    _losses(cls_rows, indent="  ")
    print(f"  accuracy (predicted intent set = reference set) {cls_summary['accuracy']:.1%}, "
          f"micro-F1 {cls_summary['micro_f1']:.3f}; the generative model's intents field: "
          f"{summary['per_field_accuracy'].get('intents', 0.0):.1%}")
    print(f"  python -m jaxsft.evaluate --model {cls_run / 'hf'} --data {INTENT_CLS_TEST} "
          "--metric accuracy")
    result.update(cls_accuracy=cls_summary["accuracy"], cls_micro_f1=cls_summary["micro_f1"])
  else:
    print(f"\n(no classification-head run in {cls_run}: python -m jaxsft.train --config "
          "configs/demo_cls.py)")
  result["final_loss"] = {s: [r["loss"] for r in rows if r["stage"] == s and
                              r["split"] == "train"][-1]
                          for s in dict.fromkeys(r["stage"] for r in rows)}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
