"""DenseNet-169 with side heads: parity with the torchvision-layout PyTorch reference, conversion, counts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch parity tests need the `test` extra (CPU torch)")

from dsn_saal_jax import convert, models  # noqa: E402
from dsn_saal_jax.models.densenet import DENSENET169_BLOCKS  # noqa: E402
from dsn_saal_jax.torch_reference import TORCH_MODELS  # noqa: E402
from test_parity import check_logits, check_training_steps, randomize_batchnorm, rel_err, torch_input  # noqa: E402

NUM_CLASSES = 3
TORCHVISION_NUM_PARAMS = 14_149_480  # DenseNet169_Weights.IMAGENET1K_V1.meta["num_params"]


def expected_param_count(in_ch, num_classes, dsn, growth=32, blocks=DENSENET169_BLOCKS, init=64, bn_size=4, fuse=1):
  """Counted from torchvision's description of DenseNet-BC, independently of the module code."""
  total, c = 7 * 7 * in_ch * init + 2 * init, init  # conv0 (no bias), norm0
  taps = [init]  # side heads: the stem, then each block's last layer's new features
  for i, n in enumerate(blocks):
    for _ in range(n):
      total += 2 * c + c * bn_size * growth  # norm1, 1x1 conv1
      total += 2 * bn_size * growth + 9 * bn_size * growth * growth  # norm2, 3x3 conv2
      c += growth
    taps.append(growth)
    if i != len(blocks) - 1:
      total += 2 * c + c * (c // 2)  # transition: norm, 1x1 conv
      c //= 2
  total += 2 * c + c * num_classes + num_classes  # norm5, classifier
  if dsn:
    total += sum(21 * t + 21 + 21 * fuse + fuse + fuse * 49 * num_classes + num_classes for t in taps)
  return total


def param_count(in_ch, num_classes, dsn):
  model = models.get_model("densenet169", num_classes=num_classes, dsn=dsn)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, in_ch))))
  return models.count_params(shapes["params"])


def test_parameter_counts_match_torchvision_and_table4():
  assert param_count(3, 1000, dsn=False) == expected_param_count(3, 1000, False) == TORCHVISION_NUM_PARAMS
  assert param_count(3, 1000, dsn=True) == expected_param_count(3, 1000, True) == 14_403_727
  assert param_count(3, NUM_CLASSES, dsn=False) == expected_param_count(3, NUM_CLASSES, False) == 12_489_475
  assert param_count(3, NUM_CLASSES, dsn=True) == expected_param_count(3, NUM_CLASSES, True) == 12_494_472
  base, dsn = param_count(1, NUM_CLASSES, dsn=False), param_count(1, NUM_CLASSES, dsn=True)
  assert (base, dsn) == (expected_param_count(1, NUM_CLASSES, False), expected_param_count(1, NUM_CLASSES, True))
  # Table 4: DenseNet-169 12.48 M, DSN-DenseNet-169 12.49 M. Ours: 12,483,203 and 12,488,200 (+4,997:
  # the stem and each block's last 32 new channels tapped; whole block outputs would give 12.56 M).
  assert (base, dsn) == (12_483_203, 12_488_200)
  assert (round(base / 1e6, 2), round(dsn / 1e6, 2)) == (12.48, 12.49)
  t = TORCH_MODELS["densenet169"](NUM_CLASSES, in_channels=1)
  assert sum(p.numel() for p in t.parameters()) == dsn


# Runs before the module-scoped fixture below exists, so that its full-size model is not alive next
# to it. The full DenseNet-169 step passes too (~150 s, 3.2 GB on 2 shared cores, almost all of it
# XLA compiling 82 dense layers' float64 forward and backward); by default the same layers at full
# width in two dense layers per block run: stem, every layer kind, all transitions and side heads.
@pytest.mark.parametrize("blocks", [
    (2, 2, 2, 2),
    pytest.param(DENSENET169_BLOCKS, marks=pytest.mark.skipif(
        not os.environ.get("DSN_SAAL_FULL_F64"), reason="full-size float64 step: set DSN_SAAL_FULL_F64=1"))])
def test_training_step_matches_torch_in_float64(blocks):
  """SAAL loss gradients of every weight and one SGD step (momentum, weight decay, BN statistics) in float64.

  Ties cannot route gradients differently here: pool0's 3x3 windows tie only at ReLU zeros (all-zero
  windows), whose input was negative, so whichever zero takes the gradient passes none back; in
  float64 no BN output lands exactly on 0.
  """
  torch.manual_seed(4)
  tmodel = TORCH_MODELS["densenet169"](NUM_CLASSES, in_channels=3, block_config=blocks)
  randomize_batchnorm(tmodel, 5)
  with jax.enable_x64(True):
    fmodel = models.DenseNet(NUM_CLASSES, block_config=blocks, dtype=jnp.float64, param_dtype=jnp.float64)
    check_training_steps(tmodel, fmodel, jnp.float64, tol=1e-6, num_steps=1, batch=2, size=64)


@pytest.fixture(scope="module")
def pair():
  """The full-size torch reference with random weights and BN statistics, and the Flax model holding them."""
  torch.manual_seed(0)
  tmodel = TORCH_MODELS["densenet169"](NUM_CLASSES, in_channels=3)
  randomize_batchnorm(tmodel, 1)
  fmodel = models.get_model("densenet169", num_classes=NUM_CLASSES)
  return tmodel, fmodel, convert.state_dict_to_variables(tmodel.state_dict(), fmodel)


# 72: maps 36 (stem), 18, 9, 4, 2, pooled to 7x7 with uneven (36, 18, 9) or overlapping (4, 2) windows; block 2
# at 9x9, so transition 2's 2x2 average pool drops a row and a column. 64 (maps 32 .. 2) covered the same cases
# except odd maps.
@pytest.mark.parametrize("size", [72])
def test_logits_parity_eval_and_train(pair, size):
  check_logits(pair, size)


def test_tiny_variant_matches_its_reference_and_marks_its_cam_layer():
  torch.manual_seed(2)
  tmodel = TORCH_MODELS["densenet_tiny"](NUM_CLASSES, in_channels=1).eval()
  randomize_batchnorm(tmodel, 3)
  fmodel = models.get_model("densenet_tiny", num_classes=NUM_CLASSES)
  variables = convert.state_dict_to_variables(tmodel.state_dict(), fmodel)
  x = np.random.RandomState(0).randn(2, 40, 40, 1).astype(np.float32)
  heads, state = jax.jit(lambda v, x: fmodel.apply(v, x, mutable=["intermediates"]))(variables, x)
  with torch.no_grad():
    expected = tmodel(torch_input(x))
  assert len(heads) == len(expected) == fmodel.num_heads == 6
  for h, e in zip(heads, expected):
    assert rel_err(h, e.numpy()) <= 1e-5
  # Grad-CAM's map is block 4 after norm5 and ReLU: 8 channels (8+4 -> 6, +4 -> 5, +4 -> 4, +4) at 1x1
  # (40 -> conv0 20 -> pool0 10 -> 5 -> 2 -> 1).
  cam = state["intermediates"]["cam"][0]
  assert cam.shape == (2, 1, 1, 8) and float(cam.min()) >= 0


def test_missing_extra_and_misshapen_keys_are_all_reported():
  sd = dict(TORCH_MODELS["densenet_tiny"](NUM_CLASSES, in_channels=3).state_dict())
  del sd["features.denseblock2.denselayer1.norm2.running_var"]
  sd["features.denseblock5.denselayer1.conv1.weight"] = torch.zeros(3)
  sd["side.3.fc.weight"] = torch.zeros(5, 49)
  with pytest.raises(ValueError) as e:
    convert.state_dict_to_variables(sd, models.get_model("densenet_tiny", num_classes=NUM_CLASSES))
  msg = str(e.value)
  assert "missing keys: ['features.denseblock2.denselayer1.norm2.running_var']" in msg
  assert "unexpected keys: ['features.denseblock5.denselayer1.conv1.weight']" in msg
  assert "side.3.fc.weight: (5, 49), expected (3, 49)" in msg


@pytest.fixture(scope="module")
def torchvision_state_dict():
  """A state_dict with torchvision densenet169's keys and shapes: our reference, dsn=False, 1000 classes."""
  torch.manual_seed(6)
  tmodel = TORCH_MODELS["densenet169"](1000, in_channels=3, dsn=False)
  randomize_batchnorm(tmodel, 7)
  return tmodel.eval()


@pytest.mark.parametrize("in_channels", [1, 3])
def test_torchvision_weights_convert_to_the_same_network(torchvision_state_dict, in_channels):
  tmodel = torchvision_state_dict
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  assert sd["features.conv0.weight"].shape == (64, 3, 7, 7) and sd["classifier.weight"].shape == (1000, 1664)
  variables = convert.torchvision_variables(sd, "densenet169", in_channels=in_channels, num_classes=1000)
  x = np.random.RandomState(in_channels).rand(2, 64, 64, in_channels).astype(np.float32)
  base = models.get_model("densenet169", num_classes=1000, dsn=False)
  (got,) = jax.jit(base.apply)(variables, x)
  with torch.no_grad():  # a gray image replicated to RGB
    (expected,) = tmodel(torch_input(np.repeat(x, 3 // in_channels, -1)))
  assert rel_err(got, expected.numpy()) <= 1e-4

  # Other class counts: the same backbone, and no last Linear (the trainer initialises it afresh).
  fewer = convert.torchvision_variables(sd, "densenet169", in_channels=in_channels, num_classes=NUM_CLASSES)
  assert "classifier" not in fewer["params"] and set(fewer["params"]) == set(variables["params"]) - {"classifier"}
  same = jax.tree_util.tree_map(np.array_equal, {**variables, "params": {
      k: v for k, v in variables["params"].items() if k != "classifier"}}, fewer)
  assert all(jax.tree_util.tree_leaves(same))


@pytest.mark.parametrize("shape", [(1, 31, 31, 3), (1, 64, 64, 2), (1, 64, 48, 3)])
def test_bad_input_is_a_clear_error(shape):
  model = models.get_model("densenet_tiny", num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match=r"DenseNet expects NHWC input with H == W >= 32 and 1 or 3 channels, "
                                       rf"got shape \({', '.join(map(str, shape))}\)"):
    model.init(jax.random.PRNGKey(0), jnp.zeros(shape))
