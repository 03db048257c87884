"""Every config file loads and validates; overrides and typos behave as on the CLI."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from jaxsft import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_recipes():
  names = {p.stem for p in CONFIGS}
  assert {"demo", "qwen1.5-72b-chat_domain_sft", "yi-34b-chat_domain_sft",
          "mixtral-8x7b-instruct_domain_sft", "mixtral-8x7b_cpt", "llama3-8b_cpt_then_sft",
          "qwen2-7b_cpt_sftmix_then_mixed_sft", "qwen2-7b-instruct_domain_sft"} <= names


def dataset_paths(config) -> list[str]:
  return [spec if isinstance(spec, str) else spec["path"]
          for stage in config.stages.values()
          for key in ("datasets", "eval_datasets") for spec in stage.data[key]]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_validates(path, tmp_path, monkeypatch):
  config = load(path).get_config()
  _stand_in_data(config, tmp_path, monkeypatch)
  config_lib.validate(config)
  assert config.stages, path
  json.loads(config.to_json())  # the resolved config is written to the run dir as JSON


def _stand_in_data(config, tmp_path, monkeypatch) -> None:
  # Recipes name placeholder data (data/your_domain_sft.jsonl, relative to the
  # working directory) that the user replaces; validation checks files exist,
  # so stand-ins are made in a scratch working directory.
  monkeypatch.chdir(tmp_path)
  for data in dataset_paths(config):
    if not pathlib.Path(data).is_absolute():
      (tmp_path / data).parent.mkdir(parents=True, exist_ok=True)
      (tmp_path / data).touch()


def _documented_variants(path: pathlib.Path) -> list[str]:
  """The overrides a recipe's docstring offers as a variant: the ``--config.``
  arguments of its ``... --config.x=y`` continuation lines."""
  tokens, inside = [], False
  for line in (load(path).__doc__ or "").splitlines():
    line = line.strip()
    inside = line.startswith("...") or (inside and bool(line))
    if inside:
      tokens += [t for t in line.split() if t.startswith("--config.")]
  return tokens


VARIANT_CONFIGS = [p for p in CONFIGS if _documented_variants(p)]


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
@pytest.mark.parametrize("path", VARIANT_CONFIGS, ids=lambda p: p.stem)
def test_variants_in_recipe_docstrings_validate(path, tmp_path, monkeypatch):
  """A variant a recipe documents (e.g. its LoRA overrides) parses and validates."""
  overrides = _documented_variants(path)
  config = parse_cli(["train", "--config", str(path), *overrides])
  _stand_in_data(config, tmp_path, monkeypatch)
  config_lib.validate(config)
  assert any("method=lora" in o for o in overrides)
  assert all(s.method == "lora" for s in config.stages.values())


def test_large_recipes_document_a_lora_variant():
  assert {p.stem for p in VARIANT_CONFIGS} >= {"yi-34b-chat_domain_sft",
                                               "qwen1.5-72b-chat_domain_sft"}


def parse_cli(argv: list[str]):
  """Parse ``argv`` exactly as ``python -m jaxsft.train`` does, on private flags."""
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv,
                                           lock_config=False, sys_argv=argv)
  fv(argv)
  return holder.value


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # in config_flags
def test_cli_overrides_reach_the_config():
  config = parse_cli(["train", "--config", str(ROOT / "configs" / "demo.py"),
                      "--config.stages.sft.lr=2e-5", "--config.stages.cpt.steps=7",
                      "--config.model.init.hidden_size=64",
                      "--config.stages.sft.neftune_noise_alpha=5"])
  assert config.stages.sft.lr == 2e-5
  assert config.stages.sft.neftune_noise_alpha == 5.0
  assert config.stages.cpt.steps == 7
  assert config.model.init["hidden_size"] == 64
  config_lib.validate(config)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_cli_typo_names_the_nearest_key():
  with pytest.raises(AttributeError, match='Did you mean "lr"'):
    parse_cli(["train", "--config", str(ROOT / "configs" / "demo.py"),
               "--config.stages.sft.lrr=2e-5"])


def test_validate_names_the_nearest_key_of_a_typo():
  config = load(ROOT / "configs" / "demo.py").get_config()
  config.stages.sft.lrr = 2e-5  # an unlocked ConfigDict takes new keys silently
  with pytest.raises(ValueError, match=r"stages\.sft: unknown key 'lrr'; did you mean 'lr'"):
    config_lib.validate(config)
  config = load(ROOT / "configs" / "demo.py").get_config()
  config.stages.cpt.data.eval_fractions = 0.1
  with pytest.raises(ValueError, match="did you mean 'eval_fraction'"):
    config_lib.validate(config)


def test_an_unknown_method_lists_the_methods():
  config = load(ROOT / "configs" / "qwen1.5-72b-chat_domain_sft.py").get_config()
  config.stages.sft.method = "ia3"
  with pytest.raises(ValueError, match="method='ia3' is not one of full, lora.*prefix"):
    config_lib.validate(config)


def test_demo_matches_its_data_and_tokenizer():
  demo = load(ROOT / "configs" / "demo.py")
  config = demo.get_config()
  tokenizer = json.loads((pathlib.Path(config.tokenizer) / "tokenizer.json").read_text())
  vocab = tokenizer["model"]["vocab"]
  init = config.model.init
  assert init["vocab_size"] == len(vocab)
  assert init["pad_token_id"] == vocab["<pad>"]
  assert init["bos_token_id"] == vocab["<s>"]
  assert init["eos_token_ids"] == (vocab["<|im_end|>"], vocab["</s>"])
  for stage in config.stages.values():
    for spec in stage.data.datasets:
      assert pathlib.Path(spec["path"]).is_file(), spec["path"]
  # The tokenizer was trained on the system prompts the demo uses.
  script = load(ROOT / "tools" / "make_demo_data.py")
  assert {demo.SUPPORT, demo.INTENT, demo.GENERAL} == set(script.SYSTEM_PROMPTS.values())


def test_a_negative_loss_chunk_is_refused_with_its_key():
  config = load(ROOT / "configs" / "demo.py").get_config()
  config.model.loss_chunk = -4
  with pytest.raises(ValueError, match=r"config\.model\.loss_chunk=-4 must be an integer >= 0"):
    config_lib.validate(config)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_scan_unroll_is_a_run_setting_that_reaches_the_model():
  """``--config.model.scan_unroll`` (the layers a loop step runs; the model's
  num_layers: no loop; 0: auto) reaches the model built for training, like
  remat; a negative count is refused naming the key (ConfigDict itself
  refuses a float for this int field)."""
  from jaxsft import trainer  # noqa: PLC0415
  config = parse_cli(["train", "--config", str(ROOT / "configs" / "demo.py"),
                      "--config.model.scan_unroll=4"])
  config_lib.validate(config)
  assert trainer.initial_config(config).scan_unroll == 4
  assert trainer.initial_config(config).layer_unroll == 4
  demo = trainer.initial_config(load(ROOT / "configs" / "demo.py").get_config())
  assert demo.scan_unroll == 0 and demo.remat == "none"  # auto: every layer unrolled
  assert demo.layer_unroll == demo.num_layers > 1
  for bad in (-1, -2):
    config.model.scan_unroll = bad
    with pytest.raises(ValueError, match=rf"config\.model\.scan_unroll={bad!r} must be an integer"):
      config_lib.validate(config)


def _cli(*args: str):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize("cli,args,needle", [
    ("jaxsft.train", ["--config.stages.sft.lrr=3"],
     'error: a --config override does not apply: no key lrr; Did you mean "lr" instead of "lrr"?'),
    ("jaxsft.data", ["--config.stages.sft.data.packin=false"],
     'no key packin; Did you mean "packing" instead of "packin"?'),
    ("jaxsft.train", ["--config.model.init.num_expert=4"],
     "error: --config.model.init.num_expert=4: 'num_expert' is not a model field; did you mean "
     "'num_experts'"),
    ("jaxsft.train", ["--config.model.init.num_layers=two"],
     "'two' is not a value of num_layers's type (int)"),
])
def test_command_line_mistakes_print_one_error_line_not_a_traceback(cli, args, needle):
  result = _cli(cli, "--config", str(ROOT / "configs" / "demo.py"), *args)
  assert result.returncode == 2, result.stderr[-2000:]
  assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_a_config_file_that_is_missing_or_has_no_get_config_is_one_error_line(tmp_path):
  no_get = tmp_path / "no_get.py"
  no_get.write_text("x = 1\n")
  for argv, needle in ((["--config", str(tmp_path / "nope.py")],
                        f"error: --config {tmp_path / 'nope.py'}: no such file"),
                       ([f"--config={no_get}", "--config.output_dir=x"],
                        f"error: --config {no_get} defines no get_config()")):
    result = _cli("jaxsft.train", *argv)
    assert result.returncode == 2, result.stderr[-2000:]
    assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_only_a_stage_of_the_same_objective_follows_a_head_stage():
  """Refused up front, not after the head stage has trained."""
  for first, then in (("cls", "sft"), ("reward", "cls"), ("cls", "lm")):
    config = load(ROOT / "configs" / "demo.py").get_config()
    config.stages.cpt.objective, config.stages.sft.objective = first, then
    config.stages.sft.generate_eval.every = 0  # a head stage generates nothing
    with pytest.raises(ValueError, match=rf"config\.stages\.sft: objective {then!r} cannot "
                       rf"follow stage 'cpt' \(objective {first!r}\)"):
      config_lib.validate(config)


def test_a_stage_name_must_be_a_plain_directory_name():
  """A name with '/' nested one stage's directories inside another's final
  model ('a' and 'a/final')."""
  config = load(ROOT / "configs" / "demo.py").get_config()
  config.stages["sft/final"] = config.stages.sft
  with pytest.raises(ValueError, match=r"config\.stages\.sft/final: a stage's name names its "
                     r"directory"):
    config_lib.validate(config)


def test_a_later_stages_data_settings_are_checked_before_the_first_stage_trains():
  """They would otherwise be checked only when that stage's data are built,
  after the stages before it have trained (hours, on a real run)."""
  for key, value, needle in (
      ("template", "chatml2", r"config\.stages\.sft\.data: template 'chatml2' is not one of"),
      ("train_on", "last", r"config\.stages\.sft\.data\.train_on 'last' is not one of"),
      ("truncation", "cut", r"config\.stages\.sft\.data\.truncation 'cut' is not one of")):
    config = load(ROOT / "configs" / "demo.py").get_config()
    config.stages.sft.data[key] = value
    with pytest.raises(ValueError, match=needle):
      config_lib.validate(config)
  config = load(ROOT / "configs" / "demo.py").get_config()
  config.stages.sft.lr = float("nan")
  with pytest.raises(ValueError, match=r"stages\.sft\.lr=nan must be a finite positive number"):
    config_lib.validate(config)
  config = load(ROOT / "configs" / "demo.py").get_config()
  config.tokenizer = "/nonexistent/tokenizer"
  with pytest.raises(ValueError, match=r"config\.tokenizer=/nonexistent/tokenizer: no such "):
    config_lib.validate(config)


def test_model_init_fields_the_config_leaves_out_are_set_from_the_command_line():
  """ml_collections cannot add a key to model.init from the command line; the
  CLIs' parser can, typed as the ModelConfig field: the demo becomes a 4-expert
  Mixtral in --plan. A config that starts from model.source is told so."""
  assert config_lib.init_override("--config.model.init.rope_theta=500000") == (
      "rope_theta", 500000.0)
  assert config_lib.init_override("--config.model.init.eos_token_ids=[2, 4]") == (
      "eos_token_ids", (2, 4))
  assert config_lib.init_override("--config.model.init.sliding_window=None") == (
      "sliding_window", None)
  assert config_lib.init_override("--config.model.init.tie_word_embeddings=True") == (
      "tie_word_embeddings", True)
  import jax  # noqa: PLC0415
  from jaxsft.models import ModelConfig, llama  # noqa: PLC0415
  demo = ROOT / "configs" / "demo.py"
  plan = _cli("jaxsft.train", "--config", str(demo), "--plan", "--config.stages.cpt.steps=1",
              "--config.model.init.family=mixtral", "--config.model.init.num_experts=4")
  assert plan.returncode == 0, plan.stderr[-2000:]
  row = next(json.loads(line) for line in plan.stdout.splitlines() if line.startswith("{"))
  init = dict(load(demo).get_config().model.init, family="mixtral", num_experts=4)
  count = lambda cfg: sum(x.size for x in jax.tree.leaves(llama.abstract_params(cfg)))  # noqa: E731
  assert row["params"] == count(ModelConfig(**init))  # four experts' MLPs per layer
  assert row["params"] > 3 * count(ModelConfig(**{**init, "num_experts": 0})) // 2
  recipe = str(ROOT / "configs" / "qwen2-7b-instruct_domain_sft.py")
  result = _cli("jaxsft.train", "--config", recipe, "--config.model.init.num_layers=2")
  assert result.returncode == 2
  assert "this config starts from model.source, not model.init" in result.stderr
