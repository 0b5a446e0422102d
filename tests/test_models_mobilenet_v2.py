"""MobileNetV2 with side heads: parity with the torchvision-layout PyTorch reference, conversion, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch parity tests need the `test` extra (CPU torch)")

from dsn_saal_jax import convert, models  # noqa: E402
from dsn_saal_jax.models.mobilenet_v2 import relu6  # noqa: E402
from dsn_saal_jax.torch_reference import TORCH_MODELS  # noqa: E402
from test_parity import check_logits, check_training_steps, randomize_batchnorm, rel_err, torch_input  # noqa: E402

NUM_CLASSES = 3
TORCHVISION_NUM_PARAMS = 3_504_872  # MobileNet_V2_Weights.IMAGENET1K_V1.meta["num_params"]
# t, c, n, s
SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def expected_param_count(in_ch, num_classes, dsn, fuse=1):
  """Counted from torchvision's description of MobileNetV2 (width 1.0), independently of the module code."""
  c = 32
  total = 9 * in_ch * c + 2 * c  # features.0: 3x3 conv (no bias), BN
  taps = []  # side heads: the last block output at each stride (2, 4, 8, 16, 32)
  for t, out, n, s in SETTING:
    for i in range(n):
      if i == 0 and s == 2:
        taps.append(c)
      hidden = c * t
      if t != 1:
        total += c * hidden + 2 * hidden  # 1x1 expansion, BN
      total += 9 * hidden + 2 * hidden + hidden * out + 2 * out  # depthwise 3x3, BN, 1x1 projection, BN
      c = out
  taps.append(c)
  total += c * 1280 + 2 * 1280 + 1280 * num_classes + num_classes  # features.18, classifier.1
  if dsn:
    assert taps == [16, 24, 32, 96, 320]
    total += sum(21 * t + 21 + 21 * fuse + fuse + fuse * 49 * num_classes + num_classes for t in taps)
  return total


def param_count(in_ch, num_classes, dsn):
  model = models.get_model("mobilenet_v2", num_classes=num_classes, dsn=dsn)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, in_ch))))
  return models.count_params(shapes["params"])


def test_parameter_counts_match_torchvision():
  assert param_count(3, 1000, dsn=False) == expected_param_count(3, 1000, False) == TORCHVISION_NUM_PARAMS
  assert param_count(3, 1000, dsn=True) == expected_param_count(3, 1000, True) == 3_765_335
  # Table 4 has no MobileNetV2 row; at 1 channel and 3 classes the side heads add 11,213.
  for in_ch, base, dsn in ((1, 2_227_139, 2_238_352), (3, 2_227_715, 2_238_928)):
    assert param_count(in_ch, NUM_CLASSES, dsn=False) == expected_param_count(in_ch, NUM_CLASSES, False) == base
    assert param_count(in_ch, NUM_CLASSES, dsn=True) == expected_param_count(in_ch, NUM_CLASSES, True) == dsn
  t = TORCH_MODELS["mobilenet_v2"](NUM_CLASSES, in_channels=1)
  assert sum(p.numel() for p in t.parameters()) == 2_238_352


def test_relu6_gradient_is_torchs():
  """hardtanh's backward: 0 at and beyond both ends, else 1 (NaN included); NaN propagates."""
  x = np.array([-1.0, 0.0, 1e-7, 3.0, 6.0 - 1e-6, 6.0, 7.0, np.nan], np.float32)
  xt = torch.tensor(x, requires_grad=True)
  torch.nn.functional.relu6(xt).sum().backward()
  np.testing.assert_array_equal(relu6(x), torch.nn.functional.relu6(torch.tensor(x)).numpy())
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(relu6(v)))(x), xt.grad.numpy())


# Biases of the projection BN of blocks whose output reaches neither a side head nor a ReLU: it flows,
# through residual additions only, into the 1x1 expansion (or features.18) of a non-residual block,
# whose train-mode BN subtracts the batch mean. A per-channel constant, which is all a bias adds,
# cannot change the loss: the gradient is exactly 0, and both sides compute rounding noise (~1e-18).
# Blocks 7-10 (64 channels, then 11: 64 -> 96) and 14-16 (160 channels, then 17: 160 -> 320);
# 11-13 reach side 4 at features.13, 17 reaches side 5.
ZERO_GRADIENT_BIASES = [f"features.{i}.conv.3.bias" for i in (7, 8, 9, 10, 14, 15, 16)]


def zero_gradient_limits(grads):
  """For each ZERO_GRADIENT_BIASES entry, the rel_err limit saying |ours - torch's| < 1e-10 x its weight's gradient.

  `grads`: torch's float64 gradients on check_training_steps' first batch, which calls this with them.
  First checks that torch's gradient there is indeed noise (< 1e-12 of the projection weight's).
  """
  limits = {}
  for name in ZERO_GRADIENT_BIASES:
    scale = np.abs(grads[name.replace("conv.3.bias", "conv.2.weight")]).max()
    noise = max(np.abs(grads[name]).max(), 1e-30)
    assert noise < 1e-12 * scale, f"{name}: torch's gradient {noise:.1e} is not ~0 next to {scale:.1e}"
    limits[name] = 1e-10 * scale / noise
  # Every other parameter has a real gradient, compared to check_training_steps' tolerance.
  for name, g in grads.items():
    if name not in limits:
      assert np.abs(g).max() > 1e-9, name
  return limits


def test_training_step_matches_torch_in_float64():
  """SAAL loss gradients of every weight and one SGD step (momentum, weight decay, BN statistics) in float64.

  Full size, dropout 0, at 48 px: maps 24, 12, 6, 3 (odd: the next stride-2 depthwise conv pads it)
  and 2x2 at stride 32, whose BatchNorms see 8 values a channel, as at 64 px; at 32 px (1x1, 2 values)
  train-mode BatchNorm would pass no gradient back at all. No ReLU6 input lands exactly on 0 or 6 in
  float64 from random weights, so both sides route every gradient alike; the biases with an
  exactly-zero gradient are compared with an absolute bound instead (see ZERO_GRADIENT_BIASES).
  """
  torch.manual_seed(4)
  tmodel = TORCH_MODELS["mobilenet_v2"](NUM_CLASSES, in_channels=3, dropout_rate=0.0)
  randomize_batchnorm(tmodel, 5)
  with jax.enable_x64(True):
    fmodel = models.get_model("mobilenet_v2", num_classes=NUM_CLASSES, dropout_rate=0.0, dtype=jnp.float64,
                              param_dtype=jnp.float64)
    check_training_steps(tmodel, fmodel, jnp.float64, tol=1e-6, num_steps=1, batch=2, size=48,
                         param_tols=zero_gradient_limits)


@pytest.fixture(scope="module")
def pair():
  """The full-size torch reference with random weights and BN statistics, and the Flax model holding them."""
  torch.manual_seed(0)
  tmodel = TORCH_MODELS["mobilenet_v2"](NUM_CLASSES, in_channels=3, dropout_rate=0.0)
  randomize_batchnorm(tmodel, 1)
  fmodel = models.get_model("mobilenet_v2", num_classes=NUM_CLASSES, dropout_rate=0.0)
  return tmodel, fmodel, convert.state_dict_to_variables(tmodel.state_dict(), fmodel)


# 64: maps 32, 16, 8, 4, 2 at the taps, all pooled to 7x7 with uneven or overlapping windows.
# 72: also odd maps: 9x9 at stride 8, so the next stride-2 depthwise conv pads an odd map (9 -> 5 -> 3).
@pytest.mark.parametrize("size", [64, 72])
def test_logits_parity_eval_and_train(pair, size):
  """All heads within 1e-4: eval mode against torch in float32, train mode against torch in float64.

  In train mode the stride-32 BatchNorms see 2x2 maps of a batch of 2 at 64 px: statistics of 8
  values per channel, which amplify float32 rounding. Measured at 64 px, side 5 and the final head
  are 4.7e-5 and 3.8e-5 from the float64 values for us, 4.3e-5 and 2.9e-5 for torch's own float32
  run, so two float32 runs differ by up to 9e-5: the exact values are the fair reference.
  """
  check_logits(pair, size, exact_train=True)


def test_tiny_variant_matches_its_reference_marks_its_cam_layer_and_drops_out():
  torch.manual_seed(2)
  tmodel = TORCH_MODELS["mobilenet_v2_tiny"](NUM_CLASSES, in_channels=1).eval()
  randomize_batchnorm(tmodel, 3)
  fmodel = models.get_model("mobilenet_v2_tiny", num_classes=NUM_CLASSES)
  variables = convert.state_dict_to_variables(tmodel.state_dict(), fmodel)
  x = np.random.RandomState(0).randn(2, 40, 40, 1).astype(np.float32)
  heads, state = jax.jit(lambda v, x: fmodel.apply(v, x, mutable=["intermediates"]))(variables, x)
  with torch.no_grad():
    expected = tmodel(torch_input(x))
  assert len(heads) == len(expected) == fmodel.num_heads == 6
  for h, e in zip(heads, expected):
    assert rel_err(h, e.numpy()) <= 1e-5
  # Grad-CAM's map: features.18 after BN and ReLU6, 1280 channels at stride 32 (40 -> 20 -> 10 -> 5 -> 3 -> 2).
  cam = state["intermediates"]["cam"][0]
  assert cam.shape == (2, 2, 2, 1280) and 0 <= float(cam.min()) and float(cam.max()) <= 6
  # Train mode drops out (rate 0.2) before the classifier only: the side heads do not move.
  train = jax.jit(lambda v, x, rng: fmodel.apply(v, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])[0])
  a, b = train(variables, x, jax.random.PRNGKey(0)), train(variables, x, jax.random.PRNGKey(1))
  assert not np.allclose(a[-1], b[-1])
  for i in range(5):
    np.testing.assert_array_equal(a[i], b[i])


def test_missing_extra_and_misshapen_keys_are_all_reported():
  sd = dict(TORCH_MODELS["mobilenet_v2_tiny"](NUM_CLASSES, in_channels=3).state_dict())
  del sd["features.2.conv.1.1.running_var"]
  sd["features.1.conv.3.weight"] = torch.zeros(3)  # a t == 1 block has no conv.3
  sd["side.4.fc.weight"] = torch.zeros(5, 49)
  with pytest.raises(ValueError) as e:
    convert.state_dict_to_variables(sd, models.get_model("mobilenet_v2_tiny", num_classes=NUM_CLASSES))
  msg = str(e.value)
  assert "missing keys: ['features.2.conv.1.1.running_var']" in msg
  assert "unexpected keys: ['features.1.conv.3.weight']" in msg
  assert "side.4.fc.weight: (5, 49), expected (3, 49)" in msg


@pytest.fixture(scope="module")
def torchvision_model():
  """Our reference with torchvision mobilenet_v2's keys and shapes: dsn=False, 1000 classes."""
  torch.manual_seed(6)
  tmodel = TORCH_MODELS["mobilenet_v2"](1000, in_channels=3, dsn=False)
  randomize_batchnorm(tmodel, 7)
  return tmodel.eval()


@pytest.mark.parametrize("in_channels", [1, 3])
def test_torchvision_weights_convert_to_the_same_network(torchvision_model, in_channels):
  tmodel = torchvision_model
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  assert sd["features.0.0.weight"].shape == (32, 3, 3, 3) and sd["classifier.1.weight"].shape == (1000, 1280)
  assert sd["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3) and sd["features.18.1.running_var"].shape == (1280,)
  variables = convert.torchvision_variables(sd, "mobilenet_v2", in_channels=in_channels, num_classes=1000)
  x = np.random.RandomState(in_channels).rand(2, 64, 64, in_channels).astype(np.float32)
  base = models.get_model("mobilenet_v2", num_classes=1000, dsn=False)
  (got,) = jax.jit(base.apply)(variables, x)
  with torch.no_grad():  # a gray image replicated to RGB
    (expected,) = tmodel(torch_input(np.repeat(x, 3 // in_channels, -1)))
  assert rel_err(got, expected.numpy()) <= 1e-4

  # Other class counts: the same backbone, and no last Linear (the trainer initialises it afresh).
  fewer = convert.torchvision_variables(sd, "mobilenet_v2", in_channels=in_channels, num_classes=NUM_CLASSES)
  assert "classifier" not in fewer["params"] and set(fewer["params"]) == set(variables["params"]) - {"classifier"}
  same = jax.tree_util.tree_map(np.array_equal, {**variables, "params": {
      k: v for k, v in variables["params"].items() if k != "classifier"}}, fewer)
  assert all(jax.tree_util.tree_leaves(same))


@pytest.mark.parametrize("shape", [(1, 31, 31, 3), (1, 64, 64, 2), (1, 64, 48, 3)])
def test_bad_input_is_a_clear_error(shape):
  model = models.get_model("mobilenet_v2_tiny", num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match=r"MobileNetV2 expects NHWC input with H == W >= 32 and 1 or 3 channels, "
                                       rf"got shape \({', '.join(map(str, shape))}\)"):
    model.init(jax.random.PRNGKey(0), jnp.zeros(shape))
