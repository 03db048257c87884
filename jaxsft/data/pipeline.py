"""One training stage's data: datasets → tokens → a mixed stream of packed batches.

    pipe = pipeline.build(stage.data, tokenizer, seq_len=stage.seq_len, seed=config.seed)
    batches = pipe.batches(batch_size, state=restored_data_state)  # endless; None = start
    for step in range(steps):
      batch = next(batches)  # tokens, loss_mask, segment_ids, positions: int32 [batch, seq_len]
      ...
      checkpoint(..., data_state=batches.state())  # {"epoch": e, "row": r}
    pipe.stats()              # examples, tokens, trained tokens, drops, packing efficiency
    for batch in pipe.eval_batches(batch_size): ...          # or (…, dataset=name)

The ``data`` config of a stage (``default_config()`` holds these defaults;
unknown keys are an error, so a typo cannot be silently ignored):

  datasets        list of dataset specs; a bare path string is short for dict(path=...)
    path            file (.jsonl .json .parquet .csv), glob, directory, saved
                    ``datasets`` directory, or hub name (``sources``)
    format          auto | alpaca | sharegpt | messages | text | label      (auto)
    columns         {canonical field: the file's column}                    ({})
    system_prompt   system message for rows that have none                  (None)
    template        this dataset's template, overriding data.template      (None)
    weight          sampling ratio among the weighted datasets              (None)
    epochs          repetitions per mixture epoch, fractional allowed      (None: 1)
    max_samples     only this dataset's first N rows                       (None: data's)
    split           split of a saved DatasetDict or hub dataset             (None: train)
    name            name in stats and errors                                (None: file name)
  template        tokenizer (its own chat template) | chatml | qwen2 | llama3 | mistral,
                  or a role-tag dict of ``templates.RoleTagTemplate`` fields (tokenizer)
  train_on        all_assistant | last_assistant | everything           (all_assistant)
                  (LLaMA-Factory's mask_history is last_assistant, its
                  train_on_prompt everything)
  max_length      longest example in tokens; at most seq_len            (None: seq_len)
  max_samples     read only the first N rows of each dataset, as LLaMA-Factory's
                  max_samples (rows dropped for length count among them)   (None: all)
  truncation      drop | keep_answer (``templates.encode``)             (drop)
  packing         pack examples into rows; False = one example per row (True)
  shuffle_buffer  examples per packing window (``mixture``)             (10000)
  eval_fraction   share of each dataset held out for evaluation        (0.0)
  eval_datasets   dataset specs read whole for evaluation              ([])
  num_proc        processes tokenizing (``datasets.map``)               (1)
  cache_dir       where tokenized datasets are kept    (None: $JAXSFT_CACHE_DIR or
                                                              ~/.cache/jaxsft/tokenized)
  pad_id          padding token id              (None: the tokenizer's pad, else eos, else 0)

Each dataset's mask comes from its own kind: raw text is trained on every
token, chats on their answers (``train_on``), so text mixed into an SFT stage
and chats mixed into continued pre-training each keep their own supervision.

Task heads (``build(..., objective="cls" | "reward")``) take label rows (cls)
or pairwise rows (reward) only, tokenized by ``templates.encode_head``; their
batches carry ``pool_index`` (and, for cls, ``labels``) instead of
``loss_mask`` (``packing.fill_head_rows``). A cls pipeline's label set is the
sorted set of labels of its training examples (``label_names``), or the
model's own when it already has a head; evaluation labels outside it get the
id ``len(label_names)`` and are counted in ``unseen_labels``.
The order, mixture and packing are described in ``mixture``; the batch arrays
in ``packing``.

Tokenization runs through ``datasets.map`` (batched; ``num_proc`` processes)
and is cached per dataset under ``cache_dir/<key>``, where the key hashes what
the tokens depend on: the bytes of every source file (and its path, which the
cached row sources name), the reading spec (format, columns, system prompt,
split), the template definition and ``train_on``, the tokenizer (its whole
serialized vocabulary, merges, normalizer and special tokens, and chat
template), ``max_length``, ``truncation``, and the code of ``formats``,
``sources`` and ``templates``. A second run with the same inputs hashes the
files and memory-maps the cache, without parsing or tokenizing anything. The
per-dataset counts (dropped, truncated) are stored beside the tokens in
``jaxsft.json``. Hashing reads every file once per run (~1 GB/s); hub
datasets, whose bytes are not local, are keyed by name and split.
``num_proc`` > 1 forks worker processes (``datasets``' pool); they run only
Python and the Rust tokenizer, never JAX, but a process that has started JAX
warns about forking. ``python -m jaxsft.data --config …`` fills the same
cache before training starts.

Resuming: ``batches.state()`` is the position after the last batch handed
out. A trainer that prefetches must save the state that goes with the last
batch it trained on. A state only means something for the same data and
settings (datasets, seq_len, packing, shuffle_buffer, seed); one that falls
outside the data is an error.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxsft.data import formats, mixture, packing, sources, templates
from jaxsft.data.formats import Conversation
from jaxsft.data.templates import Counts, Encoded

# Bump when what is stored in a cache entry changes shape, or what ``encode``
# keeps of the same rows (2: keep_answer shortens chats that list tool schemas
# without calling them, which 1 dropped).
CACHE_VERSION = 2
CACHE_META = "jaxsft.json"

DATASET_DEFAULTS: dict[str, Any] = dict(
    path=None, format="auto", columns={}, system_prompt=None, template=None, weight=None,
    epochs=None, split=None, name=None, max_samples=None)
DEFAULTS: dict[str, Any] = dict(
    datasets=[], template="tokenizer", train_on="all_assistant", max_length=None, max_samples=None,
    truncation="drop", packing=True, shuffle_buffer=10_000, eval_fraction=0.0, eval_datasets=[],
    num_proc=1, cache_dir=None, pad_id=None)

# Row status in the tokenized cache: dropped rows are kept (with no tokens) so
# the counts can be read back and rows stay aligned with the source file.
_KEPT, _TRUNCATED, _NO_ASSISTANT, _TOO_LONG = 0, 1, 2, 3


def default_config():
  """The ``data`` ConfigDict of a stage with every default (module doc)."""
  import ml_collections  # noqa: PLC0415  (only configs need it)
  from ml_collections.config_dict import placeholder  # noqa: PLC0415

  cfg = ml_collections.ConfigDict(
      {k: v for k, v in DEFAULTS.items()
       if k not in ("max_length", "max_samples", "cache_dir", "pad_id")})
  cfg.max_length = placeholder(int)
  cfg.max_samples = placeholder(int)
  cfg.cache_dir = placeholder(str)
  cfg.pad_id = placeholder(int)
  return cfg


def default_cache_dir() -> str:
  """``$JAXSFT_CACHE_DIR``, else ``~/.cache/jaxsft/tokenized``."""
  return os.environ.get("JAXSFT_CACHE_DIR") or os.path.expanduser("~/.cache/jaxsft/tokenized")


# ----------------------------------------------------------------------------- tokenized datasets

@dataclasses.dataclass
class Tokenized:
  """A tokenized dataset: the kept examples as views into flat token arrays.

  Kept example k is ``tokens[starts[k]:starts[k] + lengths[k]]`` (and the same
  slice of ``loss_mask``); it came from row ``rows[k]`` (0-based, file order)
  of the source. ``counts`` covers every row read.
  """
  name: str
  spec: dict
  tokens: np.ndarray
  loss_mask: np.ndarray
  starts: np.ndarray
  lengths: np.ndarray
  rows: np.ndarray
  sources: Any  # pyarrow array: the source (FILE:LINE) of every row, kept or not
  counts: Counts
  cache_path: str
  labels: list[list[str]] | None = None  # per kept example, for a cls head

  def __len__(self) -> int:
    return len(self.lengths)

  def example(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    s, n = self.starts[k], self.lengths[k]
    return self.tokens[s:s + n], self.loss_mask[s:s + n]

  def source(self, k: int) -> str:
    return self.sources[int(self.rows[k])].as_py()

  def trained(self) -> np.ndarray:
    """Per kept example, the number of tokens with a loss (mask 1 after the
    first token: the first token of a sequence is never predicted)."""
    cs = np.concatenate([[0], np.cumsum(self.loss_mask, dtype=np.int64)])
    return cs[self.starts + self.lengths] - cs[self.starts] - self.loss_mask[self.starts]


def tokenize(spec: Mapping[str, Any], tokenizer, *, template: Any = "tokenizer",
             train_on: str = "all_assistant", max_length: int | None = None,
             truncation: str = "drop", num_proc: int = 1, cache_dir: str | None = None,
             name: str | None = None, head: str | None = None) -> Tokenized:
  """Read, render and tokenize one dataset (a spec of ``sources``), or load it
  from the cache (module doc). ``template`` is a name or role-tag dict;
  ``head`` (cls | reward) tokenizes for a task head (``templates.encode_head``)."""
  spec = dict(spec)
  name = name or spec.get("name") or _default_name(spec["path"])
  if head is None and spec.get("format") == "pairwise":
    raise ValueError(f"dataset {name!r}: format pairwise (prompt/chosen/rejected) trains a reward "
                     "model; a language-model stage takes chat, text and label rows")
  cache_dir = cache_dir or default_cache_dir()
  key, described = _cache_key(spec, template, train_on, tokenizer, max_length, truncation, head)
  path = os.path.join(cache_dir, key)
  if not os.path.exists(os.path.join(path, CACHE_META)):
    _check_writable(cache_dir)
    _tokenize_to(path, spec, name, tokenizer, template, train_on, max_length, truncation,
                 num_proc, described, head)
  return _load(path, name, spec)


def _check_writable(cache_dir: str) -> None:
  """Fail before tokenizing, not after, where the cache cannot be written."""
  try:
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=cache_dir):
      pass
  except OSError as e:
    raise ValueError(f"data.cache_dir (default $JAXSFT_CACHE_DIR, else "
                     f"~/.cache/jaxsft/tokenized) = {cache_dir}: cannot write the tokenized cache "
                     f"there ({e.strerror}); set data.cache_dir or JAXSFT_CACHE_DIR to a writable "
                     "directory") from None


def _tokenize_to(path, spec, name, tokenizer, template_spec, train_on, max_length, truncation,
                 num_proc, described, head=None) -> None:
  import datasets  # noqa: PLC0415  (heavy)

  conversations = sources.load_examples(spec)
  for c in conversations:
    if head is not None:
      want = templates.HEAD_KINDS[head]
      if c.kind != want:
        raise ValueError(
            f"{c.source}: a {c.kind} row in dataset {name!r}, but objective {head!r} trains on "
            f"{want} rows only ({'text + label/labels' if head == 'cls' else 'prompt + chosen + rejected'}); "
            "give this stage only such datasets")
    elif c.kind == "pairwise":
      raise ValueError(f"{c.source}: a pairwise row (prompt/chosen/rejected) in dataset {name!r}; "
                       "pairwise data trains a reward model, a language-model stage takes chat, "
                       "text and label rows")
  # Text needs no template: a CPT stage on a base tokenizer (no chat template)
  # must not fail on the default template="tokenizer".
  template = None
  if any(c.kind not in ("text", "label" if head else "text") for c in conversations):
    template = templates.get_template(template_spec, tokenizer, train_on)
  table = datasets.Dataset.from_list([c.to_dict() for c in conversations])
  del conversations
  features = datasets.Features({
      "input_ids": datasets.Sequence(datasets.Value("int32")),
      "loss_mask": datasets.Sequence(datasets.Value("uint8")),
      "status": datasets.Value("int8"), "source": datasets.Value("string"),
      **({"labels": datasets.Sequence(datasets.Value("string"))} if head else {})})
  encoded = table.map(
      _encode_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
      fn_kwargs=dict(template=template, tokenizer=tokenizer, max_length=max_length,
                     truncation=truncation, head=head),
      remove_columns=table.column_names, features=features, keep_in_memory=True,
      new_fingerprint=os.path.basename(path), desc=f"tokenizing {name}")
  status = np.asarray(encoded.data.column("status").to_numpy(), np.int8)
  counts = _counts(status)
  staging = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  bars = datasets.is_progress_bar_enabled()
  datasets.disable_progress_bars()  # saving takes a moment; its bar is noise
  try:
    encoded.save_to_disk(staging)
    with open(os.path.join(staging, CACHE_META), "w") as f:
      json.dump({"name": name, "counts": counts.as_dict(), "key": described}, f, indent=1)
    try:
      os.rename(staging, path)
    except OSError:  # another process finished the same entry first; theirs is identical
      if not os.path.exists(os.path.join(path, CACHE_META)):
        raise
  finally:
    if bars:
      datasets.enable_progress_bars()
    shutil.rmtree(staging, ignore_errors=True)


def _encode_batch(batch, template, tokenizer, max_length, truncation, head=None):
  """``datasets.map`` function: Conversation dicts → ids, masks and a status per row
  (and, for a task head, the labels of each row)."""
  out = {"input_ids": [], "loss_mask": [], "status": [], "source": []}
  if head:
    out["labels"] = []
  keys = list(batch)
  for i in range(len(batch["source"])):
    conv = Conversation.from_dict({k: batch[k][i] for k in keys})
    counts = Counts()
    if head:
      enc = templates.encode_head(conv, head, template, tokenizer, max_length=max_length,
                                  truncation=truncation, counts=counts)
      out["labels"].append(list(conv.labels or []))
    else:
      enc = templates.encode(conv, template, tokenizer, max_length=max_length,
                             truncation=truncation, counts=counts)
    if enc is None:
      status = _NO_ASSISTANT if counts.dropped_no_assistant else _TOO_LONG
    else:
      status = _TRUNCATED if counts.truncated else _KEPT
    out["input_ids"].append(enc.input_ids if enc is not None else [])
    out["loss_mask"].append(enc.loss_mask if enc is not None else [])
    out["status"].append(status)
    out["source"].append(conv.source)
  return out


def _counts(status: np.ndarray) -> Counts:
  n = np.bincount(status, minlength=4)
  return Counts(examples=len(status), dropped_no_assistant=int(n[_NO_ASSISTANT]),
                dropped_too_long=int(n[_TOO_LONG]), truncated=int(n[_TRUNCATED]))


def _load(path: str, name: str, spec: dict) -> Tokenized:
  import datasets  # noqa: PLC0415

  with open(os.path.join(path, CACHE_META)) as f:
    meta = json.load(f)
  table = datasets.load_from_disk(path).data  # memory-mapped
  ids = table.column("input_ids").combine_chunks()
  mask = table.column("loss_mask").combine_chunks()
  status = table.column("status").to_numpy()
  offsets = ids.offsets.to_numpy().astype(np.int64)
  rows = np.flatnonzero(status <= _TRUNCATED)
  labels = None
  if "labels" in table.column_names:
    every = table.column("labels").to_pylist()
    labels = [every[r] for r in rows]
  return Tokenized(
      name=name, spec=spec, tokens=ids.values.to_numpy(), loss_mask=mask.values.to_numpy(),
      starts=offsets[rows], lengths=offsets[rows + 1] - offsets[rows], rows=rows,
      sources=table.column("source").combine_chunks(), counts=Counts(**{
          k: v for k, v in meta["counts"].items() if k != "kept"}), cache_path=path, labels=labels)


# ----------------------------------------------------------------------------- cache keys

def _cache_key(spec, template, train_on, tokenizer, max_length, truncation,
               head=None) -> tuple[str, dict]:
  described = {
      "version": CACHE_VERSION,
      "code": _code_hash(),
      "data": _source_fingerprint(spec["path"], spec.get("split")),
      "read": {k: spec.get(k) for k in ("format", "columns", "system_prompt", "split")},
      "template": _plain(template), "train_on": train_on,
      "tokenizer": tokenizer_fingerprint(tokenizer),
      "max_length": max_length, "truncation": truncation,
  }
  if head:  # only then, so the keys of language-model data stay what they were
    described["head"] = head
  return _sha(json.dumps(described, sort_keys=True).encode())[:24], described


@functools.lru_cache(maxsize=None)
def _code_hash() -> str:
  """The code that turns rows into tokens, read once per process: the code
  running, even if the files are edited while it runs."""
  return _sha(*(pathlib.Path(m.__file__).read_bytes() for m in (formats, sources, templates)))


def tokenizer_fingerprint(tokenizer) -> str:
  """A hash of everything that decides a tokenizer's ids: its serialized
  model (vocabulary, merges, normalizer, pre-tokenizer, post-processor, added
  tokens), special tokens and chat template."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  model = (backend.to_str() if backend is not None
           else json.dumps(sorted(tokenizer.get_vocab().items())))
  extra = json.dumps([type(tokenizer).__name__, str(tokenizer.bos_token), str(tokenizer.eos_token),
                      str(tokenizer.pad_token), getattr(tokenizer, "chat_template", None)],
                     sort_keys=True, default=str)
  return _sha(model.encode(), extra.encode())


def _source_fingerprint(path: str, split: str | None) -> dict:
  kind, where = sources.locate(path)  # a missing local path is an error here already
  if kind == "hub":  # its bytes are not local: trust the name
    return {"hub": path, "split": split}
  if kind == "saved":
    where = sorted(f for f in glob.glob(os.path.join(where, "**", "*"), recursive=True)
                   if os.path.isfile(f))
  return {"path": path, "split": split,
          "files": [[os.path.abspath(f), _file_hash(f)] for f in where]}


def _file_hash(path: str) -> str:
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


def _sha(*parts: bytes) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(hashlib.sha256(p).digest())
  return h.hexdigest()


# ----------------------------------------------------------------------------- config

def _plain(x: Any) -> Any:
  """Plain dicts and lists from ConfigDicts (nested, inside lists too)."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def _default_name(path: str) -> str:
  base = os.path.basename(path.rstrip("/")) or path
  for ext in sources.FILE_TYPES:
    if base.endswith(ext):
      return base[:-len(ext)]
  return base


def resolve_config(data_cfg: Mapping[str, Any] | None) -> dict:
  """``data_cfg`` (dict or ConfigDict) with defaults filled in and checked."""
  cfg = _plain(data_cfg or {})
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"data: unknown keys {unknown}; the keys are {sorted(DEFAULTS)}")
  cfg = {**DEFAULTS, **cfg}
  for key in ("datasets", "eval_datasets"):
    value = cfg[key] if cfg[key] is not None else []
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"data.{key} must be a list of dataset specs, got {type(value).__name__}")
    cfg[key] = [_dataset_spec(s, f"data.{key}[{i}]") for i, s in enumerate(value)]
  for spec in cfg["eval_datasets"]:
    for key in ("weight", "epochs"):
      if spec[key] is not None:
        raise ValueError(f"eval dataset {spec['path']!r}: {key} does not apply (evaluation reads "
                         "each example once); remove it")
  if cfg["train_on"] not in templates.TRAIN_ON:
    raise ValueError(f"data.train_on {cfg['train_on']!r} is not one of {templates.TRAIN_ON}")
  if cfg["truncation"] not in templates.TRUNCATION:
    raise ValueError(f"data.truncation {cfg['truncation']!r} is not one of "
                     f"{templates.TRUNCATION}")
  _check_int(cfg, "shuffle_buffer", 1)
  _check_int(cfg, "num_proc", 1)
  if cfg["max_length"] is not None:
    _check_int(cfg, "max_length", 1)
  if cfg["max_samples"] is not None:
    _check_int(cfg, "max_samples", 1)
  if cfg["pad_id"] is not None:
    _check_int(cfg, "pad_id", 0)
  if not isinstance(cfg["packing"], bool):
    raise ValueError(f"data.packing must be True or False, got {cfg['packing']!r}")
  frac = cfg["eval_fraction"]
  if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
    raise ValueError(f"data.eval_fraction must be a number in [0, 1), got {frac!r}")
  return cfg


def _check_int(cfg: dict, key: str, minimum: int) -> None:
  value = cfg[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"data.{key} must be an integer >= {minimum}, got {value!r}")


def _dataset_spec(spec: Any, where: str) -> dict:
  if isinstance(spec, (str, os.PathLike)):
    spec = {"path": spec}
  if not isinstance(spec, Mapping):
    raise ValueError(f"{where} must be a dict with at least a path, got {type(spec).__name__}")
  unknown = sorted(set(spec) - set(DATASET_DEFAULTS))
  if unknown:
    raise ValueError(f"{where} ({spec.get('path')!r}): unknown keys {unknown}; the keys are "
                     f"{sorted(DATASET_DEFAULTS)}")
  spec = {**DATASET_DEFAULTS, **spec}
  if isinstance(spec["path"], os.PathLike):
    spec["path"] = os.fspath(spec["path"])
  if not spec["path"] or not isinstance(spec["path"], str):
    raise ValueError(f"{where}: 'path' (a file, glob, directory or hub name) is required")
  n = spec["max_samples"]
  if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
    raise ValueError(f"{where} ({spec['path']!r}): max_samples must be an integer >= 1, "
                     f"got {n!r}")
  spec["columns"] = dict(spec["columns"] or {})
  formats.check_columns(spec["format"] or "auto", spec["columns"],
                        where=f"{where} ({spec['path']})")
  return spec


def dataset_names(cfg: dict) -> tuple[list[str], list[str]]:
  """The names ``build`` gives the training and the eval datasets of a
  resolved data config (``resolve_config``): each spec's name or its file's
  stem, made unique with ``#2``, ``#3``…"""
  taken: set[str] = set()
  return _unique_names(cfg["datasets"], taken), _unique_names(cfg["eval_datasets"], taken)


def _unique_names(specs: list[dict], taken: set[str]) -> list[str]:
  names = []
  for spec in specs:
    base = spec["name"] or _default_name(spec["path"])
    name, k = base, 2
    while name in taken:
      name, k = f"{base}#{k}", k + 1
    taken.add(name)
    names.append(name)
  return names


# ----------------------------------------------------------------------------- the pipeline

class _Pool:
  """Examples chosen from several tokenized datasets, named by global ids:
  dataset d's j-th pick is ``offsets[d] + j``. With ``virtual`` > 0 every
  example starts with that many virtual-token slots (ids -1, -2, …; no loss)."""

  def __init__(self, parts: list[Tokenized], picks: list[np.ndarray], virtual: int = 0):
    self.parts, self.picks, self.virtual = parts, picks, virtual
    self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in picks])]).astype(np.int64)
    self._virtual_ids = -(1 + np.arange(virtual, dtype=np.int32))

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def lengths(self, d: int) -> np.ndarray:
    return self.parts[d].lengths[self.picks[d]] + self.virtual

  def locate(self, gid: int) -> tuple[int, int]:
    """(dataset, kept example) of a global id."""
    d = int(np.searchsorted(self.offsets, gid, side="right")) - 1
    return d, int(self.picks[d][gid - self.offsets[d]])

  def get(self, gid: int) -> tuple[np.ndarray, np.ndarray]:
    d, k = self.locate(gid)
    ids, mask = self.parts[d].example(k)
    if not self.virtual:
      return ids, mask
    return (np.concatenate([self._virtual_ids, np.asarray(ids, np.int32)]),
            np.concatenate([np.zeros(self.virtual, np.asarray(mask).dtype), mask]))

  def labels(self, gid: int) -> list[str]:
    d, k = self.locate(gid)
    return self.parts[d].labels[k]


class Batches:
  """An iterator of batches (``Pipeline.batches``) that knows its position."""

  def __init__(self, pipe: "Pipeline", batch_size: int, state: dict, epochs: int | None,
               process_index: int, process_count: int):
    self._pipe, self._batch_size, self._state, self._epochs = pipe, batch_size, state, epochs
    per = batch_size // process_count
    self._local = slice(process_index * per, (process_index + 1) * per)

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows, state = self._pipe.stream.take(self._state, self._batch_size, stop_epoch=self._epochs)
    if not rows:
      raise StopIteration
    rows = rows + [np.zeros(0, np.int64)] * (self._batch_size - len(rows))  # last, short batch
    self._state = state
    return self._pipe._fill(rows[self._local], self._pipe.train)

  def state(self) -> dict[str, int]:
    """The position after the last batch returned: ``batches(state=...)``
    continues with the batch that would have come next."""
    return dict(self._state)


class Pipeline:
  """The data of one stage (module doc). Built by ``build``."""

  def __init__(self, cfg: dict, train: _Pool, eval_pool: _Pool | None, stream: mixture.RowStream,
               seq_len: int, pad_id: int, seed: int, head: str | None = None,
               label_names: tuple[str, ...] = (), slots: int = 0, max_labels: int = 1):
    self.cfg, self.train, self.eval, self.stream = cfg, train, eval_pool, stream
    self.seq_len, self.pad_id, self.seed = seq_len, pad_id, seed
    # Task heads (module doc): sequences per row, labels per example.
    self.head, self.label_names, self.slots, self.max_labels = head, label_names, slots, max_labels
    self._label_id = {name: i for i, name in enumerate(label_names)}
    self.unseen_labels: dict[str, int] = {}
    if head == "cls" and eval_pool is not None:
      for d in range(len(eval_pool.parts)):
        for k in eval_pool.picks[d]:
          for name in eval_pool.parts[d].labels[k]:
            if name not in self._label_id:
              self.unseen_labels[name] = self.unseen_labels.get(name, 0) + 1
    self.mixture = stream.mixture
    self._trained = np.concatenate([p.trained()[k] for p, k in zip(train.parts, train.picks)])
    self._last: Batches | None = None

  @property
  def datasets(self) -> list[Tokenized]:
    """The training datasets, tokenized (all kept examples, eval holdouts included)."""
    return self.train.parts

  def batches(self, batch_size: int, state: Mapping[str, int] | None = None,
              epochs: int | None = None, process_index: int = 0,
              process_count: int = 1) -> Batches:
    """Batches of ``batch_size`` rows from ``state`` (None: the start).

    Endless unless ``epochs`` is given: then it stops at the end of mixture
    epoch ``epochs`` (the last batch padded with empty rows, which carry no
    loss). With ``process_count`` > 1 each process gets its
    ``process_index``-th slice of every global batch.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} does not divide over {process_count} processes")
    state = dict(state) if state is not None else {"epoch": 0, "row": 0}
    self.stream.check(state)
    self._last = Batches(self, batch_size, state, epochs, process_index, process_count)
    return self._last

  def state(self) -> dict[str, int]:
    """The position of the last ``batches`` iterator (the start if none)."""
    return self._last.state() if self._last is not None else {"epoch": 0, "row": 0}

  def rows_per_epoch(self, epoch: int = 0) -> int:
    """Rows in mixture epoch ``epoch`` (epochs differ by a few rows: each
    packs a different shuffle)."""
    return len(self.stream.epoch(epoch))

  def steps_per_epoch(self, batch_size: int) -> int:
    """Batches in the first epoch, the last one partial."""
    return -(-self.rows_per_epoch(0) // batch_size)

  def eval_names(self) -> list[str]:
    """The datasets that hold evaluation examples, in order: their held-out
    shares (``eval_fraction``), then the ``eval_datasets``."""
    if self.eval is None:
      return []
    return [p.name for p, picks in zip(self.eval.parts, self.eval.picks) if len(picks)]

  def eval_batches(self, batch_size: int,
                   dataset: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every eval example once (only those of the eval dataset named
    ``dataset``, if given: ``eval_names``), packed, in a fixed order; the last
    batch is padded with empty rows. Nothing when there is no eval data."""
    if self.eval is None:
      return
    rows = self._eval_rows(dataset)
    for i in range(0, len(rows), batch_size):
      chunk = rows[i:i + batch_size]
      chunk = chunk + [[]] * (batch_size - len(chunk))
      yield self._fill(chunk, self.eval)

  def check_head_ends(self, pad_id: int) -> None:
    """``check_head_ends`` over every dataset of this (head) pipeline."""
    parts = self.train.parts + (self.eval.parts if self.eval is not None else [])
    check_head_ends(list({id(p): p for p in parts}.values()), pad_id)

  @property
  def multi_label(self) -> bool:
    """Whether a cls pipeline's examples may carry several labels (sigmoid head)."""
    return self.max_labels > 1

  def batch_spec(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array in every training batch of ``batch_size``
    rows: what a train step is compiled for before any batch is drawn."""
    empty = self._fill([np.zeros(0, np.int64)] * batch_size, self.train)
    return {k: (v.shape, v.dtype) for k, v in empty.items()}

  def _fill(self, rows, pool: _Pool) -> dict[str, np.ndarray]:
    if self.head is None:
      return packing.fill_rows(rows, pool.get, self.seq_len, self.pad_id)
    labels = None
    if self.head == "cls":
      unseen = len(self.label_names)
      labels = lambda gid: [self._label_id.get(n, unseen) for n in pool.labels(gid)]  # noqa: E731
    return packing.fill_head_rows(rows, pool.get, self.seq_len, self.pad_id, self.slots,
                                  labels, self.max_labels)

  def _eval_rows(self, dataset: str | None = None) -> list[list[int]]:
    if dataset is None:
      lengths = np.concatenate([self.eval.lengths(d) for d in range(len(self.eval.parts))])
      return packing.plan_rows(lengths, self.seq_len, self.cfg["packing"])
    names = [p.name for p in self.eval.parts]
    if dataset not in names:
      raise ValueError(f"no eval dataset named {dataset!r}; eval datasets: {self.eval_names()}")
    d = names.index(dataset)
    offset = int(self.eval.offsets[d])
    return [[offset + i for i in row] for row in
            packing.plan_rows(self.eval.lengths(d), self.seq_len, self.cfg["packing"])]

  def example(self, gid: int) -> tuple[str, Encoded]:
    """(dataset name, the example) of a global training id."""
    d, k = self.train.locate(gid)
    part = self.train.parts[d]
    ids, mask = part.example(k)
    return part.name, Encoded(ids.tolist(), mask.tolist(), part.source(k))

  def stats(self) -> dict[str, Any]:
    """Counts and sizes: rows read and kept, drops, tokens (each kept example
    once), one mixture epoch's examples / tokens / rows, packing efficiency,
    and the same per dataset."""
    per = []
    for d, part in enumerate(self.train.parts):
      picks = self.train.picks[d]
      per.append({"name": part.name, **part.counts.as_dict(),
                  "tokens": int(part.lengths.sum()), "trained_tokens": int(part.trained().sum()),
                  "train_examples": len(picks), "eval_examples": len(part) - len(picks),
                  "epoch_examples": self.mixture.counts[d]})
    rows = self.rows_per_epoch(0)
    plan = self.stream.epoch(0)
    placed = int(self.stream.lengths[plan.items].sum())
    total = sum((p.counts for p in self.train.parts), Counts())
    out = {
        **total.as_dict(),
        "tokens": sum(p["tokens"] for p in per),
        "trained_tokens": sum(p["trained_tokens"] for p in per),
        "epoch_examples": self.mixture.epoch_size,
        "epoch_tokens": placed,
        "epoch_trained_tokens": int(self._trained[plan.items].sum()),
        "epoch_rows": rows,
        "seq_len": self.seq_len,
        "packing": self.cfg["packing"],
        "packing_efficiency": placed / (rows * self.seq_len) if rows else 0.0,
        "eval_examples": len(self.eval) if self.eval is not None else 0,
        "datasets": per,
    }
    return out


def build(data_cfg: Mapping[str, Any] | None, tokenizer, seq_len: int, seed: int = 0,
          cache_dir: str | None = None, objective: str = "sft",
          label_names: Sequence[str] | None = None, virtual_tokens: int = 0) -> Pipeline:
  """The pipeline of one stage: tokenize (or load from cache) every dataset,
  hold out eval examples, and set up the mixture and its packed stream.

  ``cache_dir`` is used when ``data_cfg.cache_dir`` is unset (default: see
  ``default_cache_dir``). ``objective`` cls or reward builds a task head's
  pipeline (module doc); ``label_names``, a cls model's existing labels, fixes
  the label set (training labels outside it are an error). ``virtual_tokens``
  P > 0 (prompt tuning) reserves P slots at the start of every example, token
  ids -1..-P with no loss, where the model puts its learned virtual
  embeddings; examples then get at most seq_len - P tokens of their own. Every
  problem a config or file can cause is a ``ValueError`` naming the dataset
  (and file and row where there is one).
  """
  head = objective if objective in templates.HEAD_KINDS else None
  cfg = resolve_config(data_cfg)
  if not cfg["datasets"]:
    raise ValueError("data.datasets is empty: list at least one dataset, e.g. "
                     "datasets=[dict(path='train.jsonl')]")
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
    raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
  if virtual_tokens < 0 or virtual_tokens >= seq_len:
    raise ValueError(f"{virtual_tokens} virtual tokens leave no room in rows of seq_len={seq_len}; "
                     "lower peft.virtual_tokens or raise seq_len")
  max_length = cfg["max_length"] or seq_len - virtual_tokens
  if max_length > seq_len - virtual_tokens:
    extra = f" minus {virtual_tokens} virtual tokens" if virtual_tokens else ""
    raise ValueError(f"data.max_length={max_length} is longer than seq_len={seq_len}{extra}: an "
                     "example must fit in one row; lower max_length or raise seq_len")
  cache_dir = cfg["cache_dir"] or cache_dir or default_cache_dir()
  pad_id = cfg["pad_id"]
  if pad_id is None:
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)

  def tok(spec: dict, name: str) -> Tokenized:
    return tokenize(spec, tokenizer, template=spec["template"] or cfg["template"],
                    train_on=cfg["train_on"], max_length=max_length,
                    truncation=cfg["truncation"], num_proc=cfg["num_proc"],
                    cache_dir=cache_dir, name=name, head=head)

  names, eval_names = dataset_names(cfg)
  limit = length_limit(cfg, seq_len, virtual_tokens)
  parts = [tok(spec, name) for spec, name in zip(cfg["datasets"], names)]
  for part in parts:
    if len(part) == 0:
      raise ValueError(_all_dropped(part, limit, cfg["truncation"]))

  train_picks, eval_picks = [], []
  for d, (part, spec) in enumerate(zip(parts, cfg["datasets"])):
    allowed = _first_rows(part, spec["max_samples"] or cfg["max_samples"])
    held = allowed[_holdout(len(allowed), cfg["eval_fraction"], seed, d, part.name)]
    train_picks.append(np.setdiff1d(allowed, held))
    eval_picks.append(held)
  train = _Pool(parts, train_picks, virtual_tokens)

  eval_parts = [tok(spec, name) for spec, name in zip(cfg["eval_datasets"], eval_names)]
  for part in eval_parts:
    if len(part) == 0:
      raise ValueError(_all_dropped(part, limit, cfg["truncation"]))
  eval_pool = None
  if cfg["eval_fraction"] > 0 or eval_parts:
    eval_pool = _Pool(parts + eval_parts,
                      eval_picks + [_first_rows(p, spec["max_samples"] or cfg["max_samples"])
                                    for p, spec in zip(eval_parts, cfg["eval_datasets"])],
                      virtual_tokens)

  mix = mixture.Mixture([mixture.Part(p.name, len(picks), spec["weight"], spec["epochs"])
                         for p, picks, spec in zip(parts, train_picks, cfg["datasets"])], seed)
  stream = mixture.RowStream(mix, [train.lengths(d) for d in range(len(parts))], seq_len,
                             cfg["packing"], cfg["shuffle_buffer"])
  if head is None:
    return Pipeline(cfg, train, eval_pool, stream, seq_len, int(pad_id), seed)
  every = parts + eval_parts
  check_head_ends(every, int(pad_id))
  # Sequences per row: as many as the shortest example lets a row hold.
  per_item = 1 if head == "cls" else 2
  shortest = min(int(p.lengths.min()) for p in every)
  slots = per_item * (seq_len // shortest if cfg["packing"] else 1)
  names, max_labels = (), 1
  if head == "cls":
    names, max_labels = _label_set(parts, train_picks, label_names)
    max_labels = max([max_labels] + [len(x) for p in eval_parts for x in p.labels])
  return Pipeline(cfg, train, eval_pool, stream, seq_len, int(pad_id), seed, head=head,
                  label_names=names, slots=slots, max_labels=max_labels)


def check_head_ends(parts: list[Tokenized], pad_id: int) -> None:
  """transformers pools a sequence at its rightmost token that is not the pad
  id; a sequence ending in the pad id would be scored elsewhere after export.
  (The trainer checks again with the model's pad id when it differs.)"""
  for part in parts:
    marked = np.flatnonzero(part.loss_mask)
    bad = marked[part.tokens[marked] == pad_id]
    if len(bad):
      k = int(np.searchsorted(part.starts, bad[0], side="right")) - 1
      raise ValueError(
          f"{part.source(k)}: the sequence ends with the padding token id {pad_id}, and "
          "transformers' *ForSequenceClassification scores a sequence at its last token that "
          "is not padding; set data.pad_id to a token that never ends a sequence")


def _label_set(parts: list[Tokenized], picks: list[np.ndarray],
               fixed: Sequence[str] | None) -> tuple[tuple[str, ...], int]:
  """(label names, most labels on one example) of the training examples."""
  seen: dict[str, str] = {}  # label -> where it was first seen
  most = 1
  for part, pick in zip(parts, picks):
    for k in pick:
      labels = part.labels[k]
      most = max(most, len(labels))
      for name in labels:
        seen.setdefault(name, part.source(int(k)))
  if fixed:
    extra = sorted(set(seen) - set(fixed))
    if extra:
      raise ValueError(
          f"training labels {extra} (e.g. {seen[extra[0]]}) are not among the model's "
          f"{len(fixed)} labels {list(fixed)[:20]}; a classification head keeps its label set "
          "— start from a model without one to train new labels")
    return tuple(fixed), most
  return tuple(sorted(seen)), most


def _first_rows(part: Tokenized, limit: int | None) -> np.ndarray:
  """The kept examples of ``part`` that come from its first ``limit`` rows (all: None)."""
  if limit is None:
    return np.arange(len(part))
  allowed = np.flatnonzero(part.rows < limit)
  if not len(allowed):
    raise ValueError(f"dataset {part.name!r}: none of its first {limit} rows (max_samples) was "
                     "kept (too long, or no answer); raise max_samples or check the data")
  return allowed


def _holdout(n: int, fraction: float, seed: int, d: int, name: str) -> np.ndarray:
  """Sorted indices of the examples held out for eval (a seeded choice)."""
  if fraction <= 0:
    return np.zeros(0, np.int64)
  k = max(1, int(round(fraction * n)))
  if k >= n:
    raise ValueError(f"dataset {name!r}: eval_fraction={fraction} of its {n} kept examples "
                     "leaves none to train on; lower eval_fraction or use eval_datasets")
  return np.sort(np.random.default_rng([int(seed), 4, d]).permutation(n)[:k])


def length_limit(data_cfg: Mapping[str, Any], seq_len: int, virtual_tokens: int = 0) -> str:
  """The longest example a stage keeps, as its errors and warnings state it:
  ``max_length``, or seq_len less prompt tuning's virtual tokens."""
  max_length = data_cfg.get("max_length") or seq_len - virtual_tokens
  if virtual_tokens and not data_cfg.get("max_length"):
    return (f"{max_length} tokens (seq_len {seq_len} minus {virtual_tokens} virtual tokens of "
            "prompt tuning)")
  return f"max_length={max_length} tokens"


def _all_dropped(part: Tokenized, limit: str, truncation: str) -> str:
  c = part.counts
  first = part.sources[0].as_py() if len(part.sources) else part.spec["path"]
  hint = ("raise seq_len (or max_length), or set truncation='keep_answer' to shorten prompts "
          "(chats with tool calls are dropped, not shortened)"
          if truncation == "drop" else
          "raise seq_len (or max_length); chats with tool calls are dropped, not shortened")
  if c.dropped_too_long and not c.dropped_no_assistant:
    why = f"all are longer than {limit}; {hint}"
  elif c.dropped_no_assistant and not c.dropped_too_long:
    why = "none has an assistant turn to train on; check the format and columns mapping"
  else:
    why = (f"{c.dropped_too_long} are longer than {limit} ({hint}) and "
           f"{c.dropped_no_assistant} have no assistant turn")
  return (f"dataset {part.name!r} ({first} …): all {c.examples} examples were dropped: {why}")

