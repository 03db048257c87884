"""A tiny two-stage run (CPT with chat data mixed in → SFT) on data written here."""
from __future__ import annotations

import json
import pathlib

import hf_builders
from jaxsft import config as config_lib

TINY_MODEL = dict(family="llama", vocab_size=hf_builders.VOCAB, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,),
                  pad_token_id=0)


def write_data(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Files for the run: a tokenizer, raw text and alpaca-style instructions."""
  root.mkdir(parents=True, exist_ok=True)
  tok = root / "tokenizer"
  if not tok.is_dir():
    hf_builders.build_tokenizer().save_pretrained(tok)
  text, chat = root / "text.jsonl", root / "chat.jsonl"
  text.write_text("".join(json.dumps({"text": f"{hf_builders.CORPUS[i % 5]} Item {i}."}) + "\n"
                          for i in range(120)))
  chat.write_text("".join(json.dumps({"instruction": f"add {i} and {i + 1}",
                                      "output": f"{2 * i + 1}"}) + "\n" for i in range(120)))
  return {"tokenizer": tok, "text": text, "chat": chat}


def tiny_config(root: pathlib.Path, out: pathlib.Path, cpt_steps=8, sft_steps=6, **stage_kw):
  files = write_data(root)
  c = config_lib.base_config()
  c.output_dir = str(out)
  c.model.init = dict(TINY_MODEL)
  c.model.dtype = "float32"
  c.tokenizer = str(files["tokenizer"])
  common = dict(batch_size=4, seq_len=64, log_every=2, checkpoint_every=4)
  common.update(stage_kw)
  c.stages.cpt = config_lib.stage(
      objective="lm", lr=3e-3, steps=cpt_steps, **common,
      data=dict(datasets=[dict(path=str(files["text"]), weight=3.0),
                          dict(path=str(files["chat"]), weight=1.0)]))
  c.stages.sft = config_lib.stage(
      objective="sft", lr=1e-3, steps=sft_steps, **common,
      data=dict(datasets=[str(files["chat"])], template="chatml"))
  return c
