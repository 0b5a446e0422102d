"""DSN-VGG16-BN structure: heads, parameter counts, pooling semantics, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_variables
from dsn_saal_jax import models
from dsn_saal_jax.models import cpu_kernels



def expected_param_count(in_ch, num_classes, dsn, widths=models.VGG16_WIDTHS, hidden=4096, fuse=1):
  """Counted from DESIGN.md's description, independently of the module code."""
  total, c = 0, in_ch
  for n, w in zip(models.VGG16_STAGES, widths):
    for _ in range(n):
      total += 9 * c * w + w + 2 * w  # conv + bias, BN scale/bias
      if dsn:
        total += w * 21 + 21  # side 1x1 conv
      c = w
    if dsn:
      total += 21 * fuse + fuse + fuse * 49 * num_classes + num_classes
  total += c * 49 * hidden + hidden + hidden * hidden + hidden + hidden * num_classes + num_classes
  return total


@pytest.mark.parametrize("dsn,in_ch", [(False, 1), (False, 3), (True, 1), (True, 3)])
def test_full_size_parameter_count(dsn, in_ch):
  model = models.DSNVGG16BN(num_classes=3, dsn=dsn)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, in_ch))))
  n = models.count_params(shapes["params"])
  assert n == expected_param_count(in_ch, 3, dsn)
  # The paper's VGG-16 baseline has 134.28 M (Table 4); ours must agree to the reported precision.
  if not dsn:
    assert round(n / 1e6, 2) == 134.28


def test_tiny_variant_is_vgg16_bn_narrowed_and_takes_only_dropout_from_the_config():
  """vgg16_bn_tiny (the tests' model): every layer and head of VGG16-BN at VGG16_TINY_WIDTHS, a 64-unit classifier."""
  model = models.get_model("vgg16_bn_tiny", num_classes=3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1))))
  assert models.count_params(shapes["params"]) == expected_param_count(1, 3, True, models.VGG16_TINY_WIDTHS,
                                                                       models.VGG16_TINY_HIDDEN)
  assert models.config_fields("vgg16_bn_tiny") == ("dropout_rate",)  # config.model's VGG shape keys do not apply


# Built once for the module's tests: initialising (compiling one random draw per leaf) is what costs,
# and it does not depend on the input size (every head pools to 7x7 first).
@pytest.fixture(scope="module")
def tiny():
  """The tiny DSN-VGG16-BN (vgg16_bn_tiny), its variables (1-channel input) and its jitted apply, shared below."""
  model = models.get_model("vgg16_bn_tiny", num_classes=3)
  variables = init_variables(model, (1, 32, 32, 1))
  return model, variables, jax.jit(model.apply)


# 32: the smallest input (maps 32 .. 2, 1 after pool5). 45: odd maps (45 -> 22 -> 11 -> 5 -> 2 -> 1), floor
# pooling and uneven windows in every head; a larger even size (100) repeated these and was dropped.
@pytest.mark.parametrize("size", [32, 45])
def test_heads_order_and_shapes(tiny, size):
  model, variables, apply = tiny
  x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 1))
  heads = apply(variables, x)
  assert len(heads) == model.num_heads == 6
  assert all(h.shape == (2, 3) and h.dtype == jnp.float32 for h in heads)
  # The last head is the backbone's classifier: changing a side head's Linear must not move it.
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  params["side2"]["fc"]["bias"] = params["side2"]["fc"]["bias"] + 1.0
  moved = apply({**variables, "params": params}, x)
  np.testing.assert_allclose(moved[1], heads[1] + 1.0, rtol=1e-6)
  for i in (0, 2, 3, 4, 5):
    np.testing.assert_array_equal(moved[i], heads[i])


def test_baseline_has_one_head_and_same_backbone(tiny):
  dsn, v_dsn, apply = tiny
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 1))  # test_heads_order_and_shapes[32]'s: compiled once
  base = dsn.clone(dsn=False)
  v_base = jax.eval_shape(base.init, jax.random.PRNGKey(0), x)
  assert base.num_heads == 1
  assert set(v_dsn["params"]) - set(v_base["params"]) == {f"side{s}" for s in range(1, 6)}
  # The same backbone weights give the same final logits with and without side branches; they are
  # exactly the baseline's variables (same tree, same shapes).
  shared = {k: v for k, v in v_dsn["params"].items() if not k.startswith("side")}
  base_vars = {"params": shared, "batch_stats": v_dsn["batch_stats"]}
  assert jax.tree_util.tree_map(lambda a: a.shape, base_vars) == jax.tree_util.tree_map(lambda a: a.shape, v_base)
  heads = jax.jit(base.apply)(base_vars, x)
  assert len(heads) == 1
  np.testing.assert_allclose(heads[-1], apply(v_dsn, x)[-1], rtol=1e-6)


@pytest.mark.parametrize("in_size", [1, 3, 6, 7, 12, 25, 50, 100, 224])
def test_adaptive_pool_matrix_matches_torch_windows(in_size):
  m = models.adaptive_pool_matrix(in_size)
  for i in range(7):
    start, end = int(np.floor(i * in_size / 7)), int(np.ceil((i + 1) * in_size / 7))
    expected = np.zeros(in_size)
    expected[start:end] = 1 / (end - start)
    np.testing.assert_allclose(m[i], expected, rtol=1e-7)


def test_init_follows_torchvision():
  # The full-size shapes of every layer checked below (conv3_1, side3, fc7, bn2_1); stages 4-5 narrow,
  # which leaves those layers alone and fc6 at 6 M weights instead of 103 M.
  model = models.DSNVGG16BN(num_classes=3, widths=(64, 128, 256, 32, 32))
  v = init_variables(model, (1, 32, 32, 3))
  p = v["params"]
  k = np.asarray(p["conv3_1"]["kernel"])  # (3, 3, 128, 256): fan_out = 9 * 256
  assert abs(k.std() / np.sqrt(2 / (9 * 256)) - 1) < 0.02
  assert abs(np.asarray(p["fc7"]["kernel"]).std() / 0.01 - 1) < 0.01
  assert abs(np.asarray(p["side3"]["conv1"]["kernel"]).std() / 0.01 - 1) < 0.1
  assert not np.any(p["conv3_1"]["bias"]) and not np.any(p["fc8"]["bias"])
  np.testing.assert_array_equal(p["bn2_1"]["scale"], 1.0)
  np.testing.assert_array_equal(v["batch_stats"]["bn2_1"]["var"], 1.0)


def test_predict_probs():
  heads = (jnp.array([[0.0, 1.0]]), jnp.array([[2.0, 0.0]]))
  np.testing.assert_allclose(models.predict_probs(heads), jax.nn.softmax(heads[1]))
  mean = models.predict_probs(heads, "mean")
  np.testing.assert_allclose(mean, (jax.nn.softmax(heads[0]) + jax.nn.softmax(heads[1])) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="eval_head"):
    models.predict_probs(heads, "max")


@pytest.mark.parametrize("shape", [(1, 32, 40, 1), (1, 16, 16, 1), (1, 64, 64, 2), (64, 64, 1)])
def test_bad_input_shape_is_reported(shape):
  model = models.get_model("vgg16_bn_tiny", num_classes=3)
  with pytest.raises(ValueError, match=r"H == W >= 32 and 1 or 3 channels"):
    model.init(jax.random.PRNGKey(0), jnp.zeros(shape))


@pytest.mark.parametrize("size", [5, 7, 14, 25, 28, 100])
def test_adaptive_avg_pool_matches_torch(size):
  """Equal windows (a reshape and a mean) and torch's uneven or overlapping ones (a matrix product)."""
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(size).standard_normal((2, size, size, 3))
  want = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(x.transpose(0, 3, 1, 2)), 7).numpy()
  with jax.enable_x64():
    np.testing.assert_allclose(models.adaptive_avg_pool(jnp.asarray(x)), want.transpose(0, 2, 3, 1), rtol=1e-12)


@pytest.mark.parametrize("size", [14, 25])
def test_side_head_equals_its_convs_at_full_resolution_then_pooling(size):
  """Pooling first is the same function as the RCF-style head: 1x1 convs, sum, fuse, pool, Linear."""
  rng = np.random.default_rng(size)
  acts = [rng.standard_normal((2, size, size, c)) for c in (3, 5)]
  head = models.SideHead(num_classes=2, fuse_channels=2, dtype=jnp.float64, param_dtype=jnp.float64)
  with jax.enable_x64():
    params = head.init(jax.random.PRNGKey(0), [jnp.asarray(a) for a in acts])["params"]
    params = jax.tree_util.tree_map(lambda p: p + rng.standard_normal(p.shape), params)  # nonzero biases too
    conv = lambda x, p: jnp.einsum("nhwc,co->nhwo", x, p["kernel"][0, 0]) + p["bias"]
    side = sum(conv(jnp.asarray(a), params[f"conv{j + 1}"]) for j, a in enumerate(acts))
    pooled = models.flatten_nchw(models.adaptive_avg_pool(conv(side, params["fuse"])))
    want = pooled @ params["fc"]["kernel"] + params["fc"]["bias"]
    np.testing.assert_allclose(head.apply({"params": params}, [jnp.asarray(a) for a in acts]), want, rtol=1e-10)


def test_relu_equals_jax_nn_relu_in_values_nans_and_gradient():
  x = jnp.array([-2.0, -0.0, 0.0, 1e-30, 3.0, jnp.nan, -jnp.inf, jnp.inf])
  np.testing.assert_array_equal(models.relu(x), jax.nn.relu(x))
  grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.where(jnp.isnan(x), 0.0, f(x) * jnp.arange(x.size))))(x)
  np.testing.assert_array_equal(grad(models.relu), grad(jax.nn.relu))


@pytest.mark.parametrize("train", [True, False])
def test_conv_bias_gradient_is_exactly_zero_in_training_only(tiny, train):
  """Train-mode BN removes a conv bias, so its gradient is 0; with frozen (eval) BN it is not."""
  model, variables, _ = tiny
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 1))

  def loss(params):
    heads = model.apply({**variables, "params": params}, x, train=train, mutable=["batch_stats"],
                        rngs={"dropout": jax.random.PRNGKey(2)})[0]
    return sum(jnp.sum(h * jnp.arange(1.0, 4.0)) for h in heads)

  grads = jax.jit(jax.grad(loss))(variables["params"])  # one program: op by op took longer
  for name in ("conv1_1", "conv3_2", "conv5_3"):
    bias_grad = np.abs(grads[name]["bias"]).max()
    assert (bias_grad == 0) if train else (bias_grad > 1e-6), (name, bias_grad)
  assert np.abs(grads["conv1_1"]["kernel"]).max() > 1e-6


@pytest.mark.parametrize("size", [8, 7])
def test_max_pool_2x2_matches_torch_values_and_gradients(size):
  """Floor mode on odd sizes; the whole gradient goes to each window's maximum."""
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(size).standard_normal((2, size, size, 3))
  dy = np.random.default_rng(size + 1).standard_normal((2, size // 2, size // 2, 3))
  tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  ty = torch.nn.functional.max_pool2d(tx, 2, 2)
  ty.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
  with jax.enable_x64():
    y, vjp = jax.vjp(models.max_pool_2x2, jnp.asarray(x))
    np.testing.assert_array_equal(y, ty.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(vjp(jnp.asarray(dy))[0], tx.grad.numpy().transpose(0, 2, 3, 1))


def test_conv1x1_as_dot_equals_the_convolution_and_its_gradients():
  rng = np.random.default_rng(0)
  x, w, dy = rng.standard_normal((2, 5, 5, 6)), rng.standard_normal((1, 1, 6, 4)), rng.standard_normal((2, 5, 5, 4))
  numbers = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=numbers)
  dot = lambda x, w: models.conv1x1_as_dot(x, w, (1, 1), "VALID", dimension_numbers=numbers)
  with jax.enable_x64():
    (want, want_vjp), (got, got_vjp) = (jax.vjp(f, jnp.asarray(x), jnp.asarray(w)) for f in (conv, dot))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, e in zip(got_vjp(jnp.asarray(dy)), want_vjp(jnp.asarray(dy))):
      np.testing.assert_allclose(g, e, rtol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (6, 5), (3, 4, 5)])
def test_channel_sum_equals_the_sum_over_all_but_the_last_axis(shape):
  x = np.random.default_rng(len(shape)).standard_normal(shape)
  with jax.enable_x64():
    np.testing.assert_allclose(models.channel_sum(jnp.asarray(x)), x.reshape(-1, shape[-1]).sum(0), rtol=1e-12)


def test_channel_sum_rounds_no_worse_than_jnp_sum_in_float32():
  x = np.random.default_rng(0).standard_normal((8, 64, 64, 16)) + 3.0  # a large mean: rounding accumulates
  exact = x.reshape(-1, 16).sum(0)
  err = lambda s: np.max(np.abs(np.asarray(s, np.float64) - exact) / np.abs(exact))
  x32 = jnp.asarray(x, jnp.float32)
  assert err(jax.jit(models.channel_sum)(x32)) <= err(jax.jit(lambda a: jnp.sum(a, (0, 1, 2)))(x32)) + 1e-7


@pytest.mark.parametrize("shape", [(2, 5, 5, 3), (7, 3)])
def test_batch_norm_train_and_its_vjp_equal_autodiff_of_the_formula(shape):
  """The closed-form VJP against JAX's derivative of the textbook forward pass, in float64."""
  rng = np.random.default_rng(1)
  x, dy = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape)
  scale, bias = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
  axes = tuple(range(len(shape) - 1))

  def formula(x, scale, bias):
    mean, var = jnp.mean(x, axes), jnp.var(x, axes)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias

  with jax.enable_x64():
    args = tuple(jnp.asarray(a) for a in (x, scale, bias))
    (y, mean, var), vjp = jax.vjp(lambda *a: models.batch_norm_train(*a, None, 1e-5), *args)
    want_y, want_vjp = jax.vjp(formula, *args)
    np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mean, x.mean(axes), rtol=1e-12)
    np.testing.assert_allclose(var, x.var(axes), rtol=1e-12)
    zeros = jnp.zeros(shape[-1])
    for got, want in zip(vjp((jnp.asarray(dy), zeros, zeros)), want_vjp(jnp.asarray(dy))):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backbone, kwargs", [("vgg16_bn", dict(widths=(4, 8, 8, 8, 8), hidden=16)),
                                              ("mobilenet_v2_tiny", {})])
def test_cpu_kernels_and_plain_xla_forms_compute_the_same_function_and_gradients(monkeypatch, backbone, kwargs):
  """GPUs and TPUs run the plain forms (cpu_kernels.use("off")): same logits, loss gradients, BN statistics.

  VGG uses every shared kernel (BatchNorm, channel sums, ReLU, 2x2 max-pool, 1x1 convs as dots);
  MobileNet-V2 adds ReLU6. The other families use only shared kernels.
  """
  torch = pytest.importorskip("torch")
  from dsn_saal_jax import convert
  from dsn_saal_jax.torch_reference import TORCH_MODELS
  results = {}
  with jax.enable_x64(True):
    model = models.get_model(backbone, num_classes=3, dtype=jnp.float64, param_dtype=jnp.float64, **kwargs)
    x = jnp.asarray(np.random.RandomState(0).randn(3, 36, 36, 3))
    # Weights from the PyTorch reference, converted: any weights do here, and compiling model.init's
    # random draws took about as long as one of the two gradients below.
    torch.manual_seed(0)
    sd = TORCH_MODELS[backbone](3, in_channels=3, **kwargs).state_dict()
    variables = convert.state_dict_to_variables(sd, model)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    monkeypatch.setattr(cpu_kernels, "_choice", cpu_kernels._choice)  # pylint: disable=protected-access
    for choice in ("on", "off"):
      cpu_kernels.use(choice)

      def loss(params):
        heads, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.PRNGKey(1)})
        return sum(jnp.sum(jnp.sin(h)) for h in heads), (heads, updates["batch_stats"])

      # A new function each time: traced afresh under each setting, never served from the jit cache.
      (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
      results[choice] = (value, aux, grads)
  for a, b in zip(jax.tree_util.tree_leaves(results["on"]), jax.tree_util.tree_leaves(results["off"])):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  with pytest.raises(ValueError, match="DSN_SAAL_CPU_KERNELS must be auto, on or off, got 'sometimes'"):
    cpu_kernels.use("sometimes")
