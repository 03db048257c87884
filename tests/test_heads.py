"""Classification and reward heads: parity with transformers' *ForSequenceClassification
(logits, losses, import and export), packed pooling, the cls/reward stages end to end."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import hf_builders
import peft_fixtures
import train_fixtures
from jaxsft import checkpoint, config as config_lib, export, hf, trainer
from jaxsft.data import packing
from jaxsft.models import heads
from jaxsft.peft import export as peft_export
from jaxsft.peft import methods as peft_methods

LABELS = ("billing", "orders", "tech")
# Rows of different lengths; the longest passes Mistral's sliding window (8).
ROWS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [12, 13, 14], [20, 21, 22, 23, 24], [30]]


_sequence_logits = jax.jit(heads.sequence_logits, static_argnums=0)
_head_loss = jax.jit(heads.head_loss, static_argnums=(0, 3))


def _with_random_head(cfg, params, objective="cls", labels=LABELS, multi=False, seed=1):
  """A head config and params whose score weights are large enough that a
  wrong pooling position or transpose shows in the logits."""
  head_cfg = heads.head_config(cfg, objective, labels, multi)
  params = heads.attach(cfg, params, head_cfg, jax.random.key(seed))
  kernel = params["score"]["kernel_dc"]
  params["score"]["kernel_dc"] = 0.5 * jax.random.normal(jax.random.key(seed + 1), kernel.shape)
  return head_cfg, params


def _padded(rows, side, pad=0):
  t = max(len(r) for r in rows) + 2  # every row padded, the longest too
  tokens = np.full((len(rows), t), pad, np.int64)
  mask = np.zeros((len(rows), t), np.int64)
  for i, r in enumerate(rows):
    sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
    tokens[i, sl], mask[i, sl] = r, 1
  return tokens, mask


def _torch_logits(model, tokens, mask):
  with torch.no_grad():
    return model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral"])
def test_export_loads_in_transformers_with_identical_logits(hf_model_factory, tmp_path, variant):
  d, _ = hf_model_factory(variant)
  cfg, params = hf.load_params(d)
  head_cfg, params = _with_random_head(cfg, params)
  out = hf.save_params(params, head_cfg, tmp_path / "cls", tokenizer_src=d)
  config = json.loads((out / "config.json").read_text())
  family = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[variant]
  assert config["architectures"] == [f"{family}ForSequenceClassification"]
  assert config["id2label"] == {"0": "billing", "1": "orders", "2": "tech"}
  assert config["pad_token_id"] == 0 and not (out / "generation_config.json").exists()
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, attn_implementation="eager").eval()
  assert type(model).__name__ == f"{family}ForSequenceClassification"
  assert model.config.id2label == dict(enumerate(LABELS))
  for side in ("left", "right"):
    tokens, mask = _padded(ROWS, side)
    want = _torch_logits(model, tokens, mask)
    got = np.asarray(heads.sequence_logits(head_cfg, params, tokens, mask))
    np.testing.assert_allclose(got, want, atol=1e-4, err_msg=side)
  # Padding changes nothing: each row alone gives the same scores.
  alone = [np.asarray(heads.sequence_logits(head_cfg, params, np.asarray([r])))[0] for r in ROWS]
  np.testing.assert_allclose(np.stack(alone), want, atol=1e-4)
  # And the exported directory imports back to the same model.
  cfg2, params2 = hf.load_params(out)
  assert cfg2 == head_cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_import_of_a_transformers_classifier(tmp_path, variant):
  # Built by transformers itself (not by our export), with every weight random.
  config = hf_builders.build_config(variant, num_labels=4, problem_type=None,
                                    id2label={i: f"l{i}" for i in range(4)})
  torch.manual_seed(3)
  model = transformers.AutoModelForSequenceClassification.from_config(
      config, attn_implementation="eager").eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "m")
  cfg, params = hf.load_params(tmp_path / "m")
  assert cfg.num_labels == 4 and cfg.label_names == ("l0", "l1", "l2", "l3")
  assert cfg.problem_type == "single_label_classification" and "lm_head" not in params
  for side in ("left", "right"):
    tokens, mask = _padded(ROWS, side)
    np.testing.assert_allclose(np.asarray(heads.sequence_logits(cfg, params, tokens, mask)),
                               _torch_logits(model, tokens, mask), atol=1e-4, err_msg=side)


def test_reward_model_export(hf_model_factory, tmp_path):
  d, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(d)
  head_cfg, params = _with_random_head(cfg, params, "reward", labels=())
  assert (head_cfg.num_labels, head_cfg.problem_type) == (1, "regression")
  out = hf.save_params(params, head_cfg, tmp_path / "rm")
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  tokens, mask = _padded(ROWS, "left")
  np.testing.assert_allclose(np.asarray(heads.sequence_logits(head_cfg, params, tokens, mask)),
                             _torch_logits(model, tokens, mask), atol=1e-4)
  assert hf.load_params(out)[0] == head_cfg


def _seq_cls_peft_model(base_dir, adapter_dir):
  """transformers + peft's model of a SEQ_CLS adapter directory, its base
  built from ``base_dir`` with the keyword arguments the export wrote."""
  kwargs = json.loads((adapter_dir / peft_export.SEQ_CLS_FILE).read_text())
  base = transformers.AutoModelForSequenceClassification.from_pretrained(
      base_dir, attn_implementation="eager", **kwargs)
  return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize("variant,objective", [("llama", "cls"), ("qwen2", "cls"),
                                               ("llama", "reward")])
def test_peft_export_of_lora_with_a_head_is_peft_seq_cls(hf_model_factory, tmp_path, variant,
                                                         objective):
  d, _ = hf_model_factory(variant)
  cfg, params = hf.load_params(d)
  head_cfg, params = _with_random_head(cfg, params, objective, () if objective == "reward"
                                       else LABELS)
  stage = config_lib.stage(objective=objective, method="lora",
                           peft=dict(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"]))
  head_cfg, params = peft_methods.prepare(head_cfg, params, stage, jax.random.key(2))
  # Trained-looking factors: B starts at zero, which would hide a wrong layout.
  rng = np.random.default_rng(4)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32)
      if "_lora_" in str(p[-1]) else x, params)
  ckpt = tmp_path / "ckpt"
  checkpoint.save_model(ckpt, params, head_cfg, tokenizer_src=d)
  out = tmp_path / "adapter"
  assert export.main(["--checkpoint", str(ckpt), "--out", str(out), "--peft",
                      "--base-model", str(d)]) == 0
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
  model = _seq_cls_peft_model(d, out)
  base_only = heads.sequence_logits(head_cfg.replace(adapters=None),
                                    peft_methods.base_params(params), *_padded(ROWS, "left"))
  for side in ("left", "right"):
    tokens, mask = _padded(ROWS, side)
    got = np.asarray(heads.sequence_logits(head_cfg, params, tokens, mask))
    np.testing.assert_allclose(_torch_logits(model, tokens, mask), got, atol=1e-4,
                               err_msg=side)
  assert np.abs(got - np.asarray(base_only)).max() > 1e-2  # the adapter matters


def _head_batch(rows, labels=None, seq_len=24, slots=8):
  """Packed rows for a head: ``rows`` is a list of rows, each a list of
  examples (token lists, or (chosen, rejected) pairs)."""
  examples, layout = [], []
  for row in rows:
    layout.append([])
    for ex in row:
      if isinstance(ex, tuple):
        ids = ex[0] + ex[1]
        mask = [0] * (len(ex[0]) - 1) + [1] + [0] * (len(ex[1]) - 1) + [1]
      else:
        ids, mask = ex, [0] * (len(ex) - 1) + [1]
      layout[-1].append(len(examples))
      examples.append((np.asarray(ids), np.asarray(mask)))
  return packing.fill_head_rows(layout, examples.__getitem__, seq_len, 0, slots,
                                None if labels is None else labels.__getitem__, 2)


def test_packed_pooling_equals_one_example_at_a_time(hf_model_factory):
  d, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(d)
  head_cfg, params = _with_random_head(cfg, params)
  batch = _head_batch([[ROWS[0], ROWS[1]], [ROWS[2], ROWS[3], ROWS[1]]])
  assert batch["pool_index"].tolist() == [[10, 13] + [-1] * 6, [4, 5, 8] + [-1] * 5]
  logits, valid, _ = heads.pooled_logits(head_cfg, params, batch)
  # One example per padded row: the transformers-checked path above.
  tokens, mask = _padded([ROWS[0], ROWS[1], ROWS[2], ROWS[3], ROWS[1]], "right")
  alone = np.asarray(_sequence_logits(head_cfg, params, tokens, mask))
  got = np.asarray(logits)[np.asarray(valid)]
  np.testing.assert_allclose(got, alone, atol=1e-5)


@pytest.mark.parametrize("multi", [False, True])
def test_cls_loss_and_accuracy_match_transformers(hf_model_factory, tmp_path, multi):
  d, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(d)
  head_cfg, params = _with_random_head(cfg, params, multi=multi)
  examples = [ROWS[0], ROWS[1], ROWS[2], ROWS[3]]
  ids = [[0], [2], [1], [2]] if not multi else [[0, 2], [2], [1], [0, 1]]
  batch = _head_batch([[examples[0], examples[1]], [examples[2], examples[3]]], labels=ids)
  loss_sum, count, sums, _ = _head_loss(head_cfg, params, batch, "cls")

  out = hf.save_params(params, head_cfg, tmp_path / "m")
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  tokens, mask = _padded(examples, "right")
  if multi:
    target = torch.zeros(4, 3)
    for i, labels in enumerate(ids):
      target[i, labels] = 1.0
  else:
    target = torch.tensor([l[0] for l in ids])
  with torch.no_grad():
    ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask), labels=target)
  assert float(count) == 4
  np.testing.assert_allclose(float(loss_sum) / 4, ref.loss.item(), rtol=1e-5)
  logits = ref.logits.numpy()
  right = ((logits > 0) == (target.numpy() > 0)).all(-1) if multi else \
      logits.argmax(-1) == target.numpy()
  assert float(sums["correct"]) == right.sum() and float(sums["examples"]) == 4


def test_lora_dropout_applies_in_a_head_stage(hf_model_factory):
  # A head stage's loss under a dropout key is the head loss with dropout: not
  # the deterministic loss (dropout was silently off in cls/reward stages).
  d, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(d)
  head_cfg, params = _with_random_head(cfg, params)
  stage = config_lib.stage(objective="cls", method="lora",
                           peft=dict(rank=4, alpha=8.0, dropout=0.5))
  head_cfg, params = peft_methods.prepare(head_cfg, params, stage, jax.random.key(2))
  rng = np.random.default_rng(5)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32)
      if "_lora_b" in str(p[-1]) else x, params)
  batch = _head_batch([[ROWS[0], ROWS[1]], [ROWS[2], ROWS[3]]], labels=[[0], [2], [1], [2]])
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k in trainer.batch_keys("cls")}
  # stage_loss is what the train step differentiates (with the step's key).
  loss_fn = jax.jit(trainer.stage_loss, static_argnums=(0, 3))
  key = jax.random.key(7)
  _, (dropped, count, _) = loss_fn(head_cfg, params, batch, "cls", key)
  _, (plain, _, _) = loss_fn(head_cfg, params, batch, "cls")
  ref = _head_loss(head_cfg, params, batch, "cls", key)
  np.testing.assert_allclose(float(dropped), float(ref[0]), rtol=1e-6)
  assert abs(float(dropped) - float(plain)) / float(count) > 1e-3


def test_unseen_labels_count_as_wrong_and_carry_no_loss(hf_model_factory):
  d, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(d)
  head_cfg, params = _with_random_head(cfg, params)
  seen = _head_batch([[ROWS[0], ROWS[1]]], labels=[[0], [1]])
  unseen = _head_batch([[ROWS[0], ROWS[1]]], labels=[[0], [3]])  # id 3 = C: not a label
  a = _head_loss(head_cfg, params, seen, "cls")
  b = _head_loss(head_cfg, params, unseen, "cls")
  assert float(b[1]) == 1 and float(b[2]["examples"]) == 2
  logits = np.asarray(heads.pooled_logits(head_cfg, params, seen)[0])[0, :2]
  first = -jax.nn.log_softmax(logits[0])[0]
  np.testing.assert_allclose(float(b[0]), first, rtol=1e-4, atol=1e-6)
  assert float(b[2]["correct"]) == float(logits[0].argmax() == 0)
  assert float(a[1]) == 2


def test_pairwise_loss_against_torch(hf_model_factory):
  d, _ = hf_model_factory("llama")
  cfg, params = hf.load_params(d)
  head_cfg, params = _with_random_head(cfg, params, "reward", labels=())
  pairs = [(ROWS[0], ROWS[1]), (ROWS[2], ROWS[3]), (ROWS[1], ROWS[2])]
  batch = _head_batch([[pairs[0]], [pairs[1], pairs[2]]], seq_len=24)
  loss_sum, count, sums, _ = _head_loss(head_cfg, params, batch, "reward")
  tokens, mask = _padded([ids for pair in pairs for ids in pair], "left")
  r = np.asarray(_sequence_logits(head_cfg, params, tokens, mask))[:, 0]
  margins = torch.tensor(r[0::2] - r[1::2])
  want = -torch.nn.functional.logsigmoid(margins).sum().item()
  assert float(count) == 3
  np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
  np.testing.assert_allclose(float(sums["margin"]), margins.sum().item(), rtol=1e-5)
  assert float(sums["correct"]) == (margins > 0).sum().item()


# ----------------------------------------------------------------------------- training

def _label_rows(n, multi):
  """Texts whose labels are a function of their words, so a head can learn them."""
  names = ["fox", "dog", "cat"]
  rows = []
  for i in range(n):
    a = names[i % 3]
    labels = [a]
    text = f"The {a} runs {i % 7}."
    if multi and i % 4 == 0:
      b = names[(i + 1) % 3]
      labels.append(b)
      text = f"The {a} and the {b} run {i % 7}."
    rows.append({"text": text, "labels": sorted(labels)})
  return rows


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def head_runs(tmp_path_factory):
  """A cls (multi-label) run and a reward run, tiny and short."""
  root = tmp_path_factory.mktemp("heads")
  data = root / "data"
  labels = _write(root / "labels.jsonl", _label_rows(96, multi=True))
  eval_labels = _write(root / "eval_labels.jsonl",
                       _label_rows(8, multi=True) + [{"text": "The owl flies.", "labels": ["owl"]}])
  pairs = _write(root / "pairs.jsonl", [
      {"prompt": f"add {i} and 1", "chosen": f"{i + 1}", "rejected": f"{i + 2} maybe"}
      for i in range(96)])
  runs = {}
  for kind in ("cls", "reward"):
    # A head stage straight on a new causal LM (model.init): the lm_head goes.
    c = train_fixtures.tiny_config(data, root / kind)
    del c.stages["cpt"], c.stages["sft"]
    common = dict(lr=3e-3, steps=8, batch_size=4, seq_len=64, log_every=4, eval_every=4,
                  checkpoint_every=8, warmup_ratio=0.0)
    if kind == "cls":
      c.stages.head = config_lib.stage(objective="cls", **common, data=dict(
          datasets=[labels], eval_datasets=[eval_labels]))
    else:
      c.stages.head = config_lib.stage(objective="reward", **common, data=dict(
          datasets=[pairs], template="chatml", eval_fraction=0.1))
    c.export.hf = True
    trainer.train(c)
    runs[kind] = root / kind
  return runs


def _rows(out):
  return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_cls_stage_whose_data_have_one_label_is_refused(tmp_path):
  """A softmax over one class has nothing to learn (loss 0, accuracy 1 at
  every step); refused before training, saying what to do."""
  one = _write(tmp_path / "one.jsonl", [{"text": f"message {i}", "label": "refund"}
                                        for i in range(16)])
  c = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out")
  del c.stages["cpt"], c.stages["sft"]
  c.stages.head = config_lib.stage(objective="cls", steps=2, batch_size=4, seq_len=64,
                                   data=dict(datasets=[one]))
  with pytest.raises(ValueError, match=r"config\.stages\.head: the training data have one "
                     r"label \('refund'\); a softmax head over one class learns nothing"):
    trainer.train(c)
  assert not (tmp_path / "out" / "stages" / "head" / "checkpoints").exists()


def test_cls_stage_trains_a_head_and_exports_it(head_runs):
  out = head_runs["cls"]
  rows = [r for r in _rows(out) if r["stage"] == "head"]
  train = [r for r in rows if r["split"] == "train"]
  evals = [r for r in rows if r["split"] == "eval"]
  assert all(0 <= r["accuracy"] <= 1 for r in train + evals)
  # The eval-only label is reported once, in its own record.
  assert [r for r in rows if r["split"] == "data"] == [
      {"stage": "head", "step": 0, "split": "data", "unseen_labels": {"owl": 1}}]
  assert train[-1]["loss"] < train[0]["loss"]
  cfg, params = checkpoint.load_model(out / "stages" / "head" / "final")
  # The label set is the training data's, sorted; "owl" (eval only) is not in it.
  assert cfg.label_names == ("cat", "dog", "fox")
  assert cfg.problem_type == "multi_label_classification" and "lm_head" not in params
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
  assert model.config.problem_type == "multi_label_classification"
  tokens, mask = _padded(ROWS, "left")
  np.testing.assert_allclose(np.asarray(heads.sequence_logits(cfg, params, tokens, mask)),
                             _torch_logits(model, tokens, mask), atol=1e-4)


def test_reward_stage_reports_pairwise_metrics(head_runs):
  out = head_runs["reward"]
  rows = [r for r in _rows(out) if r["stage"] == "head" and r["split"] in ("train", "eval")]
  assert rows
  for r in rows:
    assert 0 <= r["pairwise_accuracy"] <= 1 and np.isfinite(r["margin"])
  train = [r for r in rows if r["split"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"]
  cfg, _ = checkpoint.load_model(out / "stages" / "head" / "final")
  assert cfg.problem_type == "regression"
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "hf")
  assert model.config.num_labels == 1


def test_a_language_model_stage_after_a_head_is_refused(head_runs, tmp_path):
  c = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out")
  c.model.init = None
  c.model.source = str(head_runs["cls"] / "stages" / "head" / "final")
  del c.stages["cpt"]
  with pytest.raises(ValueError, match="objective='sft' trains a causal LM, but the model has "
                                       "a multi_label_classification head"):
    trainer.train(c)


def test_lora_cls_stage_resumes_exactly_and_exports_peft_seq_cls(tmp_path):
  # LoRA with dropout on a head stage from a Hugging Face causal LM: killed
  # after its step-2 checkpoint and resumed, it ends where the uninterrupted
  # run ends; the adapter's recorded base is that causal LM, which
  # transformers grows a head on for PEFT's SEQ_CLS.
  hf_dir = peft_fixtures.hf_dir(tmp_path)
  c = peft_fixtures.one_stage_config(tmp_path, hf_dir, "lora", 4,
                                     dict(rank=4, alpha=8.0, dropout=0.1))
  del c.stages["sft"]
  c.stages.head = config_lib.stage(
      objective="cls", method="lora", lr=5e-3, steps=4, batch_size=4, seq_len=64, log_every=1,
      checkpoint_every=2, keep_checkpoints=5, warmup_ratio=0.0,
      peft=dict(rank=4, alpha=8.0, dropout=0.1),
      data=dict(datasets=[_write(tmp_path / "labels.jsonl", _label_rows(24, multi=False))]))
  out = trainer.train(c)
  cfg, params = checkpoint.load_model(out / "stages" / "head" / "final")
  assert cfg.adapters.lora_dropout == 0.1 and cfg.label_names == ("cat", "dog", "fox")
  final = peft_fixtures.leaves_by_path(params)
  assert np.abs(final["layers/attn/q_lora_b_rnh"]).max() > 0  # the factors trained

  resumed = peft_fixtures.resumed_leaves(c, out, tmp_path / "resumed", "head", 2)
  for path, x in resumed.items():
    np.testing.assert_array_equal(x, final[path], err_msg=path)

  adapter = tmp_path / "adapter"
  assert export.main(["--checkpoint", str(out / "stages" / "head" / "final"), "--out",
                      str(adapter), "--peft"]) == 0
  config = json.loads((adapter / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == str(hf_dir.resolve())
  model = _seq_cls_peft_model(hf_dir, adapter)
  tokens, mask = _padded(ROWS, "right")
  np.testing.assert_allclose(_torch_logits(model, tokens, mask),
                             np.asarray(heads.sequence_logits(cfg, params, tokens, mask)),
                             atol=1e-4)


def test_stage_data_of_the_wrong_kind_is_an_error(tmp_path):
  c = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out")
  del c.stages["cpt"], c.stages["sft"]
  c.stages.cls = config_lib.stage(objective="cls", steps=1, batch_size=4, seq_len=64,
                                  data=dict(datasets=[str(tmp_path / "data" / "chat.jsonl")]))
  with pytest.raises(ValueError, match=r"chat.jsonl:1: a chat row .* objective 'cls' trains on "
                                       "label rows only"):
    trainer.train(c)


# ----------------------------------------------------------------------------- data

def _segments(batch):
  """Per row, the token list of each scored sequence in slot order."""
  out = []
  for r in range(batch["tokens"].shape[0]):
    seqs = []
    for end in batch["pool_index"][r]:
      if end < 0:
        continue
      seg = batch["segment_ids"][r, end]
      seqs.append(batch["tokens"][r][batch["segment_ids"][r] == seg].tolist())
    out.append(seqs)
  return out


def test_cls_pipeline_batches_texts_with_their_label_ids(tokenizer_dir, tmp_path):
  from jaxsft.data import pipeline
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  rows = _label_rows(30, multi=True)
  train = _write(tmp_path / "train.jsonl", rows)
  evals = _write(tmp_path / "eval.jsonl", rows[:3] + [{"text": "An owl.", "labels": ["owl"]}])
  pipe = pipeline.build(dict(datasets=[train], eval_datasets=[evals]), tok, seq_len=48,
                        objective="cls", cache_dir=str(tmp_path / "cache"))
  assert pipe.label_names == ("cat", "dog", "fox") and pipe.multi_label
  assert pipe.unseen_labels == {"owl": 1}
  by_ids = {tuple(tok(r["text"])["input_ids"]): r["labels"] for r in rows}
  batch = next(pipe.batches(4))
  assert set(batch) == {"tokens", "segment_ids", "positions", "pool_index", "labels"}
  seen = 0
  for r, seqs in enumerate(_segments(batch)):
    for s, ids in enumerate(seqs):
      ids_of = [i for i in batch["labels"][r, s] if i >= 0]
      assert [pipe.label_names[i] for i in ids_of] == by_ids[tuple(ids)]
      seen += 1
  assert seen > 4  # several examples packed per row
  # In evaluation, the unseen label gets the id len(label_names).
  labels = np.concatenate([b["labels"][b["pool_index"] >= 0] for b in pipe.eval_batches(4)])
  assert (labels == 3).sum() == 1 and len(labels) == 4


def test_reward_pipeline_pairs_the_chat_renderings(tokenizer_dir, tmp_path):
  from jaxsft.data import pipeline
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  rows = [{"prompt": f"add {i} and 1", "chosen": f"{i + 1}", "rejected": "no idea",
           "system": "Be brief."} for i in range(12)]
  pipe = pipeline.build(dict(datasets=[_write(tmp_path / "p.jsonl", rows)]), tok, seq_len=256,
                        objective="reward", cache_dir=str(tmp_path / "cache"))

  def render(row, answer):
    msgs = [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": answer}]
    return tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]

  want = {tuple(render(r, r["chosen"])): tuple(render(r, r["rejected"])) for r in rows}
  batch = next(pipe.batches(2))
  assert "labels" not in batch
  pairs = [seqs[i:i + 2] for seqs in _segments(batch) for i in range(0, len(seqs), 2)]
  assert len(pairs) >= 3
  for chosen, rejected in pairs:
    assert want[tuple(chosen)] == tuple(rejected)


def test_pipeline_head_errors(tokenizer_dir, tmp_path):
  from jaxsft.data import pipeline
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  labels = _write(tmp_path / "l.jsonl", _label_rows(6, multi=False))
  with pytest.raises(ValueError, match=r"l.jsonl:1: a label row .* objective 'reward' trains on "
                                       "pairwise rows only"):
    pipeline.build(dict(datasets=[labels]), tok, seq_len=48, objective="reward",
                   cache_dir=str(tmp_path / "c"))
  # A text whose last token is the padding id would be scored elsewhere by transformers.
  with pytest.raises(ValueError, match=r"l.jsonl:1: the sequence ends with the padding token id"):
    pipeline.build(dict(datasets=[labels], pad_id=tok("The fox runs 0.")["input_ids"][-1]), tok,
                   seq_len=48, objective="cls", cache_dir=str(tmp_path / "c"))
  with pytest.raises(ValueError, match=r"training labels \['cat', 'dog', 'fox'\] .* are not "
                                       "among the model's 1 labels"):
    pipeline.build(dict(datasets=[labels]), tok, seq_len=48, objective="cls",
                   label_names=("bird",), cache_dir=str(tmp_path / "c"))


def test_data_cli_shows_where_a_head_stage_scores(tmp_path):
  import io
  from jaxsft.data import __main__ as data_cli
  c = train_fixtures.tiny_config(tmp_path / "data", tmp_path / "out")
  c.stages.cls = config_lib.stage(objective="cls", seq_len=64, data=dict(
      datasets=[_write(tmp_path / "l.jsonl", _label_rows(10, multi=False))],
      cache_dir=str(tmp_path / "cache")))
  out = io.StringIO()
  figures = data_cli.run(c, "cls", show=1, out=out, color=False)
  assert figures["stage"] == "cls" and figures["examples"] == 10
  # One marked token per example: its last, where the head reads it.
  assert figures["trained_tokens"] == 10 and out.getvalue().split("\n")[1].endswith(".]]")
