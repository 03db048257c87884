"""The foundation, end to end, on a tiny Llama-shaped model built here.

    python tools/foundation_demo.py [--out runs/demo]

This is what `make demo` runs until the training pipeline lands (then it runs
configs/demo.py through `python -m jaxsft.train`). Steps, each through the
public API or CLI a user would call:
  1. train a small byte-level BPE tokenizer on the text below; initialize a
     tiny Llama with jaxsft and export it as a Hugging Face directory;
  2. load that directory with transformers and compare logits with jaxsft's;
  3. generate greedily with `python -m jaxsft.generate` and with transformers;
  4. evaluate the next-token loss with `python -m jaxsft.evaluate` and compare.
The weights are random (nothing is trained yet), so the text is gibberish; the
point is that both implementations compute the same function.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import hf
from jaxsft.models import ModelConfig, llama

CORPUS = [
    "Customer asked for a refund of the last invoice because the order arrived damaged.",
    "The billing team confirmed the refund and sent a new invoice to the customer.",
    "To reset the password, open the account settings and choose a new password.",
    "Shipping takes three to five business days; express delivery takes one day.",
    "The support agent escalated the ticket to the network operations team.",
] * 40


def build_tokenizer(out: pathlib.Path):
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=512, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  fast.chat_template = (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  fast.save_pretrained(out)
  return fast


def run(*cmd) -> str:
  result = subprocess.run([sys.executable, "-m", *map(str, cmd)], capture_output=True, text=True)
  if result.returncode:
    sys.exit(f"{' '.join(map(str, cmd))} failed:\n{result.stderr}")
  return result.stdout


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/demo")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  hf_dir = out / "hf"

  print("1. tokenizer + tiny Llama (random weights) → Hugging Face directory")
  tok_dir = pathlib.Path(tempfile.mkdtemp())
  tokenizer = build_tokenizer(tok_dir)
  cfg = ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=128,
                    intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=32, max_position_embeddings=512, bos_token_id=1,
                    eos_token_ids=(2,), pad_token_id=0)
  params = llama.init_params(cfg, jax.random.key(0))
  hf.save_params(params, cfg, hf_dir, tokenizer_src=tok_dir, overwrite=True)
  print(f"   wrote {hf_dir}: {sorted(p.name for p in hf_dir.iterdir())}")

  print("2. transformers loads it; logits agree")
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  ids = tokenizer(CORPUS[0])["input_ids"]
  with torch.no_grad():
    ref = model(torch.tensor([ids])).logits.numpy()
  _, reloaded = hf.load_params(hf_dir)
  ours, _ = llama.forward(cfg, reloaded, jnp.asarray([ids]))
  print(f"   max |logits - transformers| = {np.abs(np.asarray(ours) - ref).max():.2e}")

  print("3. greedy generation: jaxsft CLI vs transformers")
  prompt = "The billing team"
  ours_text = run("jaxsft.generate", "--model", hf_dir, "--prompt", prompt,
                  "--max-new-tokens", 20).rstrip("\n")
  with torch.no_grad():
    ref_ids = model.generate(torch.tensor([tokenizer(prompt)["input_ids"]]), do_sample=False,
                             max_new_tokens=20)[0, len(tokenizer(prompt)["input_ids"]):]
  ref_text = tokenizer.decode(ref_ids, skip_special_tokens=True)
  print(f"   jaxsft:       {ours_text!r}\n   transformers: {ref_text!r}\n"
        f"   identical: {ours_text == ref_text}")

  print("4. next-token loss: jaxsft CLI vs transformers")
  data = out / "eval.jsonl"
  data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[:5]))
  result = json.loads(run("jaxsft.evaluate", "--model", hf_dir, "--data", data,
                          "--format", "text").strip().splitlines()[-1])
  total = count = 0.0
  for text in CORPUS[:5]:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
      total += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
    count += ids.shape[1] - 1
  print(f"   jaxsft loss {result['loss']:.6f} over {result['tokens']} tokens; "
        f"transformers {total / count:.6f}")
  print(f"\nDone. The exported model is in {hf_dir}.")


if __name__ == "__main__":
  main()
