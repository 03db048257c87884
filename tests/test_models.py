"""Parity of jaxsft's decoder family with transformers (fp32, CPU, tiny random models)."""
from __future__ import annotations

import contextlib
import copy
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_builders
from jaxsft import hf
from jaxsft.models import ModelConfig, llama, model_config

ALL_VARIANTS = sorted(hf_builders.VARIANTS)
SEQ = 24  # longer than mistral's window (8) and llama_dynamic's max positions (16)


def _tokens(batch=2, seq=SEQ, seed=0):
  return np.random.RandomState(seed).randint(3, hf_builders.VOCAB, (batch, seq))


def _load(hf_model_factory, variant, **overrides):
  path, torch_model = hf_model_factory(variant, **overrides)
  cfg, params = hf.load_params(path)
  return cfg, params, torch_model


def _torch_forward(model, tokens, **kw):
  with torch.no_grad():
    return model(torch.tensor(tokens), **kw)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_logits_match_transformers(hf_model_factory, variant):
  cfg, params, model = _load(hf_model_factory, variant)
  tokens = _tokens()
  ref = _torch_forward(model, tokens).logits.numpy()
  logits, _ = llama.forward(cfg, params, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["llama_bias", "mistral", "qwen2", "mixtral"])
@pytest.mark.parametrize("scan_unroll,fused", [(1, "off"), (2, "off"), (1, "on")])
def test_gradients_match_transformers(hf_model_factory, tmp_path, variant, scan_unroll, fused):
  """Every weight's gradient of the next-token loss equals PyTorch autograd's
  on the transformers model: the hand-written backward passes (SwiGLU,
  RMSNorm, the CPU projections), the recomputed MLP hidden state of the
  rolled layer scan, tied embeddings, biases, the sliding window and the MoE;
  and q/k/v and gate/up as one matmul each (``fused_projections``, a GPU's
  default), so that the concatenated weights' gradients reach each weight.
  The torch gradients come back through the real loading path: written as a
  checkpoint in place of the weights, read by ``hf.load_params``."""
  cfg, params, model = _load(hf_model_factory, variant)
  cfg = cfg.replace(scan_unroll=scan_unroll, fused_projections=fused)
  if fused == "on":  # the logits too
    logits, _ = llama.forward(cfg, params, jnp.asarray(_tokens()))
    np.testing.assert_allclose(np.asarray(logits), _torch_forward(model, _tokens()).logits.numpy(),
                               atol=1e-4, rtol=0)
  tokens = _tokens()
  grad_model = copy.deepcopy(model)
  grad_model.zero_grad()
  grad_model(torch.tensor(tokens), labels=torch.tensor(tokens)).loss.backward()
  with torch.no_grad():
    for p in grad_model.parameters():
      p.copy_(p.grad)
  grad_model.save_pretrained(tmp_path)
  _, want = hf.load_params(tmp_path, cfg)
  got = jax.grad(_loss_fn(cfg))(params, jnp.asarray(tokens))
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    ref = np.asarray(flat_want[path])
    np.testing.assert_allclose(np.asarray(g), ref, atol=2e-6 + 1e-4 * np.abs(ref).max(),
                               rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("variant,change", [
    ("mistral", dict(sliding_window=None)),
    ("llama_dynamic", dict(rope_scaling=())),
    ("llama3", dict(rope_scaling=())),
    ("llama_yarn", dict(rope_scaling=())),
    ("llama_linear", dict(rope_scaling=())),
])
def test_feature_under_test_is_exercised(hf_model_factory, variant, change):
  """Without the sliding window / rope scaling the logits differ: the parity
  test above really covers those features at this sequence length."""
  cfg, params, model = _load(hf_model_factory, variant)
  ref = _torch_forward(model, _tokens()).logits.numpy()
  logits, _ = llama.forward(cfg.replace(**change), params, jnp.asarray(_tokens()))
  assert np.abs(np.asarray(logits) - ref).max() > 1e-3


def test_mixtral_aux_loss_matches_transformers(hf_model_factory):
  cfg, params, model = _load(hf_model_factory, "mixtral")
  tokens = _tokens(batch=3)
  ref = _torch_forward(model, tokens, output_router_logits=True)
  _, aux = llama.forward(cfg, params, jnp.asarray(tokens))
  np.testing.assert_allclose(float(aux["aux_loss"]), float(ref.aux_loss), rtol=1e-5)
  fractions = np.asarray(aux["expert_fractions"])
  np.testing.assert_allclose(fractions.sum(), 1.0, rtol=1e-6)
  assert (fractions > 0.05).sum() >= 3, f"router should pick varied experts, got {fractions}"


def test_mixtral_aux_loss_ignores_padding(hf_model_factory):
  """Padding (segment 0) neither routes nor counts, as with transformers' attention_mask."""
  cfg, params, model = _load(hf_model_factory, "mixtral")
  tokens = _tokens(batch=2)
  mask = np.ones_like(tokens)
  mask[1, 15:] = 0
  ref = _torch_forward(model, tokens, attention_mask=torch.tensor(mask), output_router_logits=True)
  _, aux = llama.forward(cfg, params, jnp.asarray(tokens), segment_ids=jnp.asarray(mask))
  np.testing.assert_allclose(float(aux["aux_loss"]), float(ref.aux_loss), rtol=1e-5)


def _pack(examples, row_len):
  tokens = np.zeros((1, row_len), np.int32)
  segments = np.zeros((1, row_len), np.int32)
  positions = np.zeros((1, row_len), np.int32)
  at = 0
  for i, ex in enumerate(examples):
    tokens[0, at:at + len(ex)] = ex
    segments[0, at:at + len(ex)] = i + 1
    positions[0, at:at + len(ex)] = np.arange(len(ex))
    at += len(ex)
  return tokens, segments, positions


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "mixtral", "llama_dynamic"])
def test_packed_segments_equal_separate_runs(hf_model_factory, variant):
  cfg, params, _ = _load(hf_model_factory, variant)
  rng = np.random.RandomState(1)
  examples = [rng.randint(3, hf_builders.VOCAB, n) for n in (11, 5, 14)]
  tokens, segments, positions = _pack(examples, row_len=36)  # 6 padding slots at the end
  packed, _ = llama.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(segments))
  at = 0
  for ex in examples:
    alone, _ = llama.forward(cfg, params, jnp.asarray(ex)[None])
    np.testing.assert_allclose(np.asarray(packed[0, at:at + len(ex)]), np.asarray(alone[0]),
                               atol=1e-5, rtol=0)
    at += len(ex)


def _tiny(**kw):
  base = dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=8)
  return ModelConfig(**{**base, **kw})


def _loss_fn(cfg):
  def loss(params, tokens):
    logits, _ = llama.forward(cfg, params, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
  return loss


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "save_attention_out",
                                   "projections_attention"])
def test_remat_policies_keep_gradients(remat):
  cfg = _tiny()
  params = llama.init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(_tokens(seq=12) % 64)
  ref = jax.grad(_loss_fn(cfg))(params, tokens)
  got = jax.grad(_loss_fn(cfg.replace(remat=remat)))(params, tokens)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref, got)


def test_projections_attention_keeps_the_projections_and_recomputes_the_rest():
  """``remat="projections_attention"`` keeps what is costly to recompute (a
  projection's output: a contraction over the model width; cuDNN attention's
  outputs) and recomputes what is cheap (LoRA's rank-sized (x·A)·B, batched
  attention scores, everything elementwise): same gradients as no remat at a
  width where projections are kept, and a step whose buffers lie between
  full remat's and none's."""
  policy = llama._REMAT["projections_attention"]
  bf16 = jnp.bfloat16
  aval = lambda *shape: jax.ShapeDtypeStruct(shape, bf16)  # noqa: E731
  dot = lambda x, w, contract, batch=((), ()): policy(  # noqa: E731
      jax.lax.dot_general_p, x, w, dimension_numbers=(contract, batch), precision=None,
      preferred_element_type=None)
  assert dot(aval(16384, 2048), aval(2048, 8192), ((1,), (0,)))      # x·W: kept
  assert dot(aval(16384, 2048), aval(2048, 16), ((1,), (0,)))        # LoRA x·A: kept
  assert not dot(aval(16384, 16), aval(16, 2048), ((1,), (0,)))      # LoRA (x·A)·B: redone
  assert not dot(aval(8, 32, 2048, 64), aval(8, 32, 2048, 64), ((3,), (3,)),
                 ((0, 1), (0, 1)))                                    # scores: redone
  assert not policy(jax.lax.exp_p, aval(8, 2048))                     # elementwise: redone

  cfg = _tiny(hidden_size=512, intermediate_size=1024, num_heads=8, num_kv_heads=4, head_dim=64)
  params = llama.init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(_tokens(seq=32) % 64)
  ref = jax.grad(_loss_fn(cfg))(params, tokens)
  temp = {}
  for remat in ("none", "projections_attention", "full"):
    grad = jax.jit(jax.grad(_loss_fn(cfg.replace(remat=remat))))
    got = grad(params, tokens)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref, got)
    temp[remat] = grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
  assert temp["full"] < temp["projections_attention"] < temp["none"], temp


@pytest.mark.parametrize("remat", ["save_attention_out", "projections_attention"])
def test_attention_policies_keep_the_cudnn_forward_outputs(remat):
  """Both policies that keep attention's output keep every output of jax's
  cuDNN attention forward primitive (its backward kernel reads the softmax
  statistics too; keeping the named output alone saved nothing over 'full'
  for Llama-3-8B LoRA compiled for an H200). The primitive is matched by
  name; if jax renames it, this fails rather than the policy silently
  recomputing attention."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415
  policy = llama._REMAT[remat]
  bf16 = jax.ShapeDtypeStruct((8, 2048, 32, 64), jnp.bfloat16)
  assert policy(cudnn._dot_product_attention_fwd_p, bf16, bf16, bf16)
  assert not policy(cudnn._dot_product_attention_bwd_p, bf16, bf16, bf16)
  assert not policy(jax.lax.exp_p, bf16)
  if remat == "save_attention_out":  # projections are recomputed
    assert not policy(jax.lax.dot_general_p, jax.ShapeDtypeStruct((16384, 2048), jnp.bfloat16),
                      jax.ShapeDtypeStruct((2048, 8192), jnp.bfloat16),
                      dimension_numbers=(((1,), (0,)), ((), ())), precision=None,
                      preferred_element_type=None)


def test_unrolled_layers_keep_their_remat():
  """Unrolled (``scan_unroll`` > 1), the forward pass and the backward pass's
  recomputation meet in one program, where XLA's CSE would merge them and
  undo the remat (compiled for an H200: 1B full with remat full unrolled held
  36.6 GiB, as much as no remat, and 20.8 with the fence; tests/test_aot.py
  checks that where the CUDA plugin is installed). The remat is then fenced
  (``prevent_cse``: optimization barriers); rolled it needs none, and the
  gradients are the same either way."""
  cfg = _tiny(remat="full")
  params = llama.init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(_tokens(seq=12) % 64)
  ref = jax.grad(_loss_fn(cfg.replace(remat="none")))(params, tokens)
  for unroll, fenced in ((1, False), (2, True)):
    grad = jax.grad(_loss_fn(cfg.replace(scan_unroll=unroll)))
    lowered = jax.jit(grad).lower(params, tokens).as_text()
    assert ("optimization_barrier" in lowered) == fenced
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref,
                           grad(params, tokens))


def test_auto_scan_unroll_unrolls_only_without_remat():
  """``scan_unroll`` 0 (the default, auto): with remat "none" every layer is
  unrolled (no loop in the program), with a remat policy or beyond
  AUTO_UNROLL_MAX_LAYERS the layers run in a rolled loop; a set count is
  kept as it is."""
  assert _tiny().scan_unroll == 0
  for remat, unroll, loop in (("none", 2, False), ("full", 1, True),
                              ("projections_attention", 1, True)):
    cfg = _tiny(remat=remat)
    assert cfg.layer_unroll == unroll
    params = llama.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(_tokens(seq=12) % 64)
    lowered = jax.jit(jax.grad(_loss_fn(cfg))).lower(params, tokens).as_text()
    assert ("stablehlo.while" in lowered) == loop, remat
  assert _tiny(scan_unroll=1).layer_unroll == 1
  assert _tiny(remat="full", scan_unroll=2).layer_unroll == 2
  # Deeper than AUTO_UNROLL_MAX_LAYERS: rolled, as its unrolled compile would take long.
  deep = model_config.AUTO_UNROLL_MAX_LAYERS
  assert _tiny(num_layers=deep).layer_unroll == deep
  assert _tiny(num_layers=deep + 1).layer_unroll == 1


def test_layer_scan_keeps_only_gate_and_up_of_each_mlp():
  """Of the MLP's [B,T,F] values the rolled layer scan keeps for the backward
  pass only gate's and up's outputs (SwiGLU's product is recomputed; autodiff
  of silu(gate)·up kept six), and RMSNorm keeps no second copy of its input:
  the stacked residuals models/elementwise.py is about."""
  cfg = _tiny(scan_unroll=1)  # L=2, F=48, D=32
  params = llama.init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(_tokens(seq=12) % 64)  # B=2, T=12
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(_loss_fn(cfg), params, tokens)
  kept = out.getvalue().splitlines()
  scan = [line.split()[0] for line in kept if "output of scan" in line]
  assert scan.count("f32[2,2,12,48]") == 2, kept
  # The layer inputs, attention's residual stream and the two norms' outputs (the
  # projections' inputs); autodiff kept six, with each norm's normalized fp32 value.
  assert scan.count("f32[2,2,12,32]") == 4, kept


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_elementwise_backward_passes_match_autodiff(dtype):
  """models/elementwise.py's SwiGLU and RMSNorm: the forward values are the
  plain ops' bit for bit; the gradients equal autodiff's in fp32 and, in
  bf16, are at least as close to the fp32 gradients as autodiff's own."""
  from jaxsft.models import elementwise  # noqa: PLC0415
  k = jax.random.split(jax.random.key(0), 6)
  gate, up = (3 * jax.random.normal(key, (4, 16, 96)) for key in k[:2])
  x = 4 * jax.random.normal(k[2], (4, 16, 64)) + 1
  scale = 1 + 0.1 * jax.random.normal(k[3], (64,))
  ct_h, ct_y = jax.random.normal(k[4], (4, 16, 96)), jax.random.normal(k[5], (4, 16, 64))

  def plain_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)

  cases = [
      (elementwise.swiglu, lambda g, u: jax.nn.silu(g) * u, (gate, up), ct_h, False),
      (lambda x, s: elementwise.rms_norm(x, s, 1e-6), lambda x, s: plain_norm(x, s, 1e-6),
       (x, scale), ct_y, True),
  ]
  for fused, plain, args, ct, param_second in cases:
    cast = tuple(a if param_second and i == 1 else a.astype(dtype) for i, a in enumerate(args))
    np.testing.assert_array_equal(np.asarray(fused(*cast), np.float32),
                                  np.asarray(plain(*cast), np.float32))
    grad = lambda f, a: jax.grad(  # noqa: E731
        lambda *a: jnp.sum(f(*a).astype(jnp.float32) * ct), argnums=(0, 1))(*a)
    got, auto = grad(fused, cast), grad(plain, cast)
    ref = grad(plain, args)  # fp32 throughout
    for g, a, r in zip(got, auto, ref):
      g, a, r = (np.asarray(t, np.float32) for t in (g, a, r))
      if dtype == jnp.float32:
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
      else:
        assert np.abs(g - r).max() <= np.abs(a - r).max(), (np.abs(g - r).max(), np.abs(a - r).max())


def test_layer_scan_program_size_does_not_grow_with_depth():
  """Rolled (``scan_unroll`` 1, and auto with a remat policy), the lowered
  forward+backward of 32 layers is the same program as for 2: the layer loop
  is a scan (compile *time* is benchmarked in docs/BENCHMARKS.md; this is its
  deterministic cause)."""
  sizes = {}
  for layers in (2, 32):
    cfg = _tiny(num_layers=layers, scan_unroll=1)
    abstract = llama.abstract_params(cfg)
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    text = jax.jit(jax.grad(_loss_fn(cfg))).lower(abstract, tokens).as_text()
    sizes[layers] = (text.count("\n"), text.count("dot_general"))
  assert sizes[32] == sizes[2], sizes


def test_bf16_compute_policy_close_to_fp32():
  cfg = _tiny()
  params = llama.init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(_tokens(seq=12) % 64)
  ref, _ = llama.forward(cfg, params, tokens)
  got, _ = llama.forward(cfg.replace(dtype="bfloat16"), params, tokens)
  assert got.dtype == jnp.float32  # logits come out in fp32 for the loss
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=5e-2)
  bf16_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  got2, _ = llama.forward(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"), bf16_params, tokens)
  np.testing.assert_allclose(np.asarray(got2), np.asarray(ref), atol=5e-2)


@pytest.mark.parametrize("bad,match", [
    (dict(family="gpt2"), "family"),
    (dict(num_heads=6, num_kv_heads=4), "multiple of num_kv_heads"),
    (dict(remat="sometimes"), "remat"),
    (dict(rope_scaling=(("rope_type", "longrope"),)), "rope_scaling type"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
])
def test_model_config_rejects_bad_values(bad, match):
  with pytest.raises(ValueError, match=match):
    _tiny(**bad)


def test_model_config_json_round_trip():
  cfg = _tiny(rope_scaling=(("factor", 8.0), ("rope_type", "llama3")), eos_token_ids=(2, 7))
  assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("n_in,shapes", [(1, ((2, 5, 6), (6, 3, 4))), (2, ((2, 5, 3, 4), (3, 4, 6)))])
def test_dense_projection_matches_einsum_and_its_autodiff(n_in, shapes):
  """models/dense.py's hand-written backward (the CPU path) gives autodiff's
  values and gradients; a weight held constant gets no gradient computation."""
  from jaxsft.models import dense  # noqa: PLC0415
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, shapes[0]), jax.random.normal(kw, shapes[1])
  ct = jax.random.normal(kg, dense._einsum(x, w, n_in).shape)

  def loss(f):
    return lambda x, w: jnp.sum(f(x, w, n_in) * ct)

  got = jax.value_and_grad(loss(dense.project), argnums=(0, 1))(x, w)
  want = jax.value_and_grad(loss(dense._einsum), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  # Forward + dx + dW: three matmuls; with the weight a constant (frozen, as
  # under LoRA) the weight-gradient matmul is not computed: two.
  both = jax.make_jaxpr(jax.grad(loss(dense.project), argnums=(0, 1)))(x, w)
  frozen = jax.make_jaxpr(jax.grad(lambda x: loss(dense.project)(x, w)))(x)
  assert (str(both).count("dot_general"), str(frozen).count("dot_general")) == (3, 2)


@pytest.mark.parametrize("mask", ["causal", "packed", "window"])
def test_blocked_attention_matches_one_masked_softmax(mask):
  """The XLA path's causal query blocks (on CPU in the heads-first layout,
  models/attention.py) give the values and q/k/v gradients of one masked
  softmax over the whole row, differentiated by autodiff: causal only
  (``segment_ids`` None), packed segments with padding, and a sliding window
  that drops whole key blocks; GQA (4 query heads on 2 kv heads)."""
  from jaxsft.models import attention  # noqa: PLC0415
  b, t, n, k, h = 2, 512, 4, 2, 8  # 4 query blocks of 128
  kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (b, t, n, h))
  key, val = jax.random.normal(kk, (b, t, k, h)), jax.random.normal(kv, (b, t, k, h))
  ct = jax.random.normal(kg, (b, t, n, h))
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  segments, window = None, None
  if mask == "packed":  # row 0: examples of 300 and 150 tokens, then 62 of padding
    segments = np.ones((b, t), np.int32)
    segments[0, 300:450], segments[0, 450:] = 2, 0
    positions[0, 300:450] = np.arange(150)
  if mask == "window":
    window = 200  # the last block's queries see none of the first 128 keys
  assert attention._causal_blocks(t) == 4

  def blocked(q, key, val):
    return attention.dot_product_attention(q, key, val, segment_ids=segments, positions=positions,
                                           sliding_window=window, impl="xla")

  def reference(q, key, val):
    slots = np.broadcast_to(np.arange(t), (b, t))
    segs = np.ones((b, t), np.int32) if segments is None else segments
    full = attention.attention_mask(slots, slots, segs, segs, positions, positions, window)
    return attention._xla_attention(q, key, val, full, 1.0 / np.sqrt(h))

  live = np.ones((b, t), bool) if segments is None else segments != 0  # padding rows: unused
  ct = ct * live[:, :, None, None]

  # One program each (op by op, the first case spent ~13 s compiling primitives).
  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grads(fn, q, key, val, ct):
    out, vjp = jax.vjp(fn, q, key, val)
    return out, vjp(ct)

  got, got_grads = value_and_grads(blocked, q, key, val, ct)
  want, want_grads = value_and_grads(reference, q, key, val, ct)
  np.testing.assert_allclose(np.asarray(got)[live], np.asarray(want)[live], rtol=1e-5, atol=1e-5)
  for g, r in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
