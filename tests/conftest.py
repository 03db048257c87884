"""Shared fixtures: a tiny tokenizer and tiny random Hugging Face models, built
on the fly with transformers (no network, nothing downloaded)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tokenized-data caches of test runs stay out of the user's ~/.cache. XLA
# programs compiled in one test (or one of its subprocesses: a resumed run
# compiles what the killed one did) are loaded by the next from JAX's
# persistent compilation cache: ~20% less CPU time for the training tests.
# The process that makes a directory (pytest-xdist's controller; its workers
# and the tests' subprocesses inherit the variable) removes it at exit.
for _var, _prefix in (("JAXSFT_CACHE_DIR", "jaxsft-test-cache-"),
                      ("JAX_COMPILATION_CACHE_DIR", "jaxsft-test-xla-")):
  if _var not in os.environ:
    os.environ[_var] = tempfile.mkdtemp(prefix=_prefix)
    atexit.register(shutil.rmtree, os.environ[_var], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The suite compiles far more than it runs (tiny models, a few steps each), and
# most of a CPU compile is LLVM optimizing the generated code: without that
# (-O0) a tiny train step compiles in 1.4 s instead of 2.8 and a trainer run
# takes half the time. What is checked (results against transformers/peft,
# bit-identical resumes and shardings) does not depend on LLVM's optimizations.
# Subprocesses inherit it; those that simulate devices append to XLA_FLAGS.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

import hf_builders  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """A directory holding a tiny byte-level BPE tokenizer with a chat template."""
  d = tmp_path_factory.mktemp("tokenizer")
  hf_builders.build_tokenizer().save_pretrained(d)
  return d


@pytest.fixture(scope="session")
def hf_model_factory(tmp_path_factory):
  """``make(variant, **config_overrides) -> (dir, torch_model)``; cached per arguments."""
  cache = {}

  def make(variant: str = "llama", **overrides):
    key = (variant, tuple(sorted(overrides.items())))
    if key not in cache:
      d = tmp_path_factory.mktemp(variant)
      model = hf_builders.build_model(variant, **overrides)
      model.save_pretrained(d)
      hf_builders.build_tokenizer().save_pretrained(d)
      cache[key] = (d, model)
    return cache[key]

  return make
