"""ResNet-50 / ResNeXt-50 with side heads: parity with the torchvision-layout PyTorch reference, conversion, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch parity tests need the `test` extra (CPU torch)")

from conftest import init_variables  # noqa: E402
from dsn_saal_jax import convert, models  # noqa: E402
from dsn_saal_jax.torch_reference import TORCH_MODELS  # noqa: E402
from test_parity import check_logits, check_training_steps, randomize_batchnorm, rel_err, torch_input  # noqa: E402

NUM_CLASSES = 3
FAMILY = ("resnet50", "resnext50_32x4d")
# torchvision's published `num_params` (ResNet50_Weights / ResNeXt50_32X4D_Weights .meta) and Table 4 of the paper.
TORCHVISION_NUM_PARAMS = {"resnet50": 25_557_032, "resnext50_32x4d": 25_028_904}
TABLE4_MILLIONS = {"resnet50": (23.51, 23.59), "resnext50_32x4d": (22.98, 23.06)}
STRUCTURE = {"resnet50": dict(groups=1, width_per_group=64), "resnext50_32x4d": dict(groups=32, width_per_group=4)}


def expected_param_count(in_ch, num_classes, dsn, groups=1, width_per_group=64, stages=(3, 4, 6, 3), fuse=1):
  """Counted from torchvision's description of ResNet / ResNeXt, independently of the module code."""
  total = 7 * 7 * in_ch * 64 + 2 * 64  # stem conv (no bias), BN
  inplanes, taps = 64, [64]
  for i, n in enumerate(stages):
    planes = 64 * 2 ** i
    width, out = planes * width_per_group // 64 * groups, 4 * planes
    for b in range(n):
      total += inplanes * width + 2 * width  # 1x1 + BN
      total += 9 * width * width // groups + 2 * width  # grouped 3x3 + BN
      total += width * out + 2 * out  # 1x1 + BN
      if b == 0:
        total += inplanes * out + 2 * out  # projection + BN
      inplanes = out
    taps.append(out)
  total += inplanes * num_classes + num_classes
  if dsn:  # one tap per stage: 1x1 conv to 21, fuse 21 -> fuse, 7x7 pool, Linear
    total += sum(21 * c + 21 + 21 * fuse + fuse + fuse * 49 * num_classes + num_classes for c in taps)
  return total


def param_count(name, in_ch, num_classes, dsn):
  model = models.get_model(name, num_classes=num_classes, dsn=dsn)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, in_ch))))
  return models.count_params(shapes["params"])


@pytest.mark.parametrize("name", FAMILY)
def test_parameter_counts_match_torchvision_and_table4(name):
  n = param_count(name, 3, 1000, dsn=False)
  assert n == expected_param_count(3, 1000, False, **STRUCTURE[name]) == TORCHVISION_NUM_PARAMS[name]
  assert param_count(name, 3, 1000, dsn=True) == expected_param_count(3, 1000, True, **STRUCTURE[name])
  base, dsn = param_count(name, 1, NUM_CLASSES, dsn=False), param_count(name, 1, NUM_CLASSES, dsn=True)
  assert base == expected_param_count(1, NUM_CLASSES, False, **STRUCTURE[name])
  assert dsn == expected_param_count(1, NUM_CLASSES, True, **STRUCTURE[name])
  # One side head per stage (stem, layer1..4) is what the paper's increments imply.
  assert (round(base / 1e6, 2), round(dsn / 1e6, 2)) == TABLE4_MILLIONS[name]


# Full-size ResNet-50 (peak ~3 GB, mostly this test), and for the grouped convs' gradients a small
# ResNeXt (8 groups of 2-16 channels): the full-size ResNeXt-50 step took ~35 s more on 2 shared cores
# and runs no other code (same blocks, same grouped 3x3 conv). Runs before the module-scoped fixtures
# below exist, so that their full-size models are not alive next to it.
@pytest.mark.parametrize("name,kwargs", [("resnet50", {}),
                                         ("resnet_tiny", dict(width=16, groups=8, width_per_group=8))])
def test_training_step_matches_torch_in_float64(name, kwargs):
  """SAAL loss gradients of every weight and one SGD step (momentum, weight decay, BN statistics) in float64."""
  torch.manual_seed(4)
  tmodel = TORCH_MODELS[name](NUM_CLASSES, in_channels=3, **kwargs)
  randomize_batchnorm(tmodel, 5)
  with jax.enable_x64(True):
    fmodel = models.get_model(name, num_classes=NUM_CLASSES, dtype=jnp.float64, param_dtype=jnp.float64, **kwargs)
    check_training_steps(tmodel, fmodel, jnp.float64, tol=1e-6, num_steps=1, batch=2, size=64)


@pytest.fixture(scope="module", params=FAMILY)
def pair(request):
  """The full-size torch reference with random weights and BN statistics, and the Flax model holding them."""
  torch.manual_seed(0)
  tmodel = TORCH_MODELS[request.param](NUM_CLASSES, in_channels=3)
  randomize_batchnorm(tmodel, 1)
  fmodel = models.get_model(request.param, num_classes=NUM_CLASSES)
  return request.param, tmodel, fmodel, convert.state_dict_to_variables(tmodel.state_dict(), fmodel)


# 80: maps 40, 20, 10 (even, halved exactly) then 5, 3 (odd: the stride-2 convs pad them), pooled to 7x7 with
# uneven (40, 20, 10) and overlapping (5, 3) windows. 64 (maps 32 .. 2) covered the same cases except odd maps.
@pytest.mark.parametrize("size", [80])
def test_logits_parity_eval_and_train(pair, size):
  check_logits(pair[1:], size)


def test_missing_extra_and_misshapen_keys_are_all_reported():
  sd = dict(TORCH_MODELS["resnet_tiny"](NUM_CLASSES, in_channels=3).state_dict())
  del sd["layer2.0.downsample.1.running_var"]
  sd["layer5.0.conv1.weight"] = torch.zeros(3)
  sd["side.3.fc.weight"] = torch.zeros(5, 49)
  with pytest.raises(ValueError) as e:
    convert.state_dict_to_variables(sd, models.get_model("resnet_tiny", num_classes=NUM_CLASSES))
  msg = str(e.value)
  assert "missing keys: ['layer2.0.downsample.1.running_var']" in msg
  assert "unexpected keys: ['layer5.0.conv1.weight']" in msg
  assert "side.3.fc.weight: (5, 49), expected (3, 49)" in msg


@pytest.mark.parametrize("name", sorted(set(FAMILY) | {"resnet_tiny"}))
@pytest.mark.parametrize("dsn", [False, True])
def test_torch_reference_keys_are_the_converters(name, dsn):
  """Every TORCH_MODELS entry loads strictly (all keys, all shapes) and round-trips to identical arrays."""
  tmodel = TORCH_MODELS[name](NUM_CLASSES, in_channels=1, dsn=dsn)
  fmodel = models.get_model(name, num_classes=NUM_CLASSES, dsn=dsn)
  variables = convert.state_dict_to_variables(tmodel.state_dict(), fmodel)
  back = convert.variables_to_state_dict(variables, fmodel)
  assert set(back) == set(tmodel.state_dict())
  for key, value in tmodel.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


@pytest.fixture(scope="module")
def torchvision_resnet50():
  """Our reference with torchvision resnet50's exact state_dict keys and shapes (dsn=False, 1000 classes)."""
  torch.manual_seed(2)
  tmodel = TORCH_MODELS["resnet50"](1000, in_channels=3, dsn=False)
  randomize_batchnorm(tmodel, 3)
  return tmodel.eval()


# Each input kind (RGB, gray summed into one channel) and each classifier case (torchvision's 1000 classes
# kept, another count left to the trainer) once; the other two pairings compiled two more networks.
@pytest.mark.parametrize("in_channels,num_classes", [(3, 1000), (1, 3)])
def test_torchvision_conversion(torchvision_resnet50, in_channels, num_classes):
  sd = {k: v.numpy() for k, v in torchvision_resnet50.state_dict().items()}
  pretrained = convert.torchvision_variables(sd, "resnet50", in_channels, num_classes)
  tmodel = torchvision_resnet50
  if num_classes != 1000:
    assert "fc" not in pretrained["params"]  # re-initialised by the trainer: here, the same random fc on both sides
    tmodel = TORCH_MODELS["resnet50"](num_classes, in_channels=3, dsn=False).eval()
    fc = {"fc.weight": tmodel.fc.weight, "fc.bias": tmodel.fc.bias}
    tmodel.load_state_dict({**torchvision_resnet50.state_dict(), **fc})
    pretrained["params"]["fc"] = {"kernel": fc["fc.weight"].detach().numpy().T,
                                  "bias": fc["fc.bias"].detach().numpy()}
  else:
    np.testing.assert_array_equal(pretrained["params"]["fc"]["kernel"], sd["fc.weight"].T)
  x = np.random.RandomState(in_channels).rand(2, 64, 64, in_channels).astype(np.float32)
  base = models.get_model("resnet50", num_classes=num_classes, dsn=False)
  variables = convert.merge_pretrained(jax.eval_shape(lambda: base.init(jax.random.PRNGKey(0), x)), pretrained)
  # The converted network computes what the torchvision network computes (gray images replicated to RGB).
  with torch.no_grad():
    expected = tmodel(torch_input(np.repeat(x, 3 // in_channels, -1)))[-1].numpy()
  got = jax.jit(base.apply)(variables, x)[-1]
  assert got.shape == (2, num_classes)
  assert rel_err(got, expected) <= 1e-4, f"rel err {rel_err(got, expected):.2e}"


def test_init_is_torchvisions():
  """Kaiming-normal (fan_out) bias-free convs, BN 1/0, torch-default Linear."""
  model = models.get_model("resnet_tiny", num_classes=100, dsn=False, width=16)
  params = init_variables(model, (1, 32, 32, 1))["params"]
  conv = np.asarray(params["layer4_0"]["conv2"]["kernel"])  # (3, 3, 128, 128)
  assert abs(conv.std() / np.sqrt(2 / (9 * 128)) - 1) < 0.02 and abs(conv.mean()) < 1e-3
  stem = np.asarray(params["conv1"]["kernel"])  # fan_out 7*7*16
  assert abs(stem.std() / np.sqrt(2 / (49 * 16)) - 1) < 0.1
  fc, bound = params["fc"], 1 / np.sqrt(512)
  for leaf in (np.asarray(fc["kernel"]), np.asarray(fc["bias"])):
    assert bound >= np.abs(leaf).max() > 0.9 * bound
  assert np.asarray(fc["kernel"]).std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
  bn = params["layer2_0"]["bn3"]
  assert np.all(np.asarray(bn["scale"]) == 1) and np.all(np.asarray(bn["bias"]) == 0)
  assert "bias" not in params["layer1_0"]["conv1"] and "bias" not in params["conv1"]


def test_tiny_variant_heads_and_downsampling():
  model = models.get_model("resnet_tiny", num_classes=NUM_CLASSES)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 45, 45, 1))
  tmodel = TORCH_MODELS["resnet_tiny"](NUM_CLASSES, in_channels=1)
  variables = convert.state_dict_to_variables(tmodel.state_dict(), model)
  assert set(variables["params"]) == {"conv1", "bn1", "fc", *(f"layer{i}_0" for i in range(1, 5)),
                                      *(f"side{s}" for s in range(1, 6))}
  assert all("downsample_conv" in variables["params"][f"layer{i}_0"] for i in range(1, 5))
  heads = jax.jit(model.apply)(variables, x)
  assert len(heads) == model.num_heads == 6 and all(h.shape == (2, NUM_CLASSES) for h in heads)
  # The same backbone weights give the same final logits with and without side branches.
  base = model.clone(dsn=False)
  assert base.num_heads == 1
  shared = {k: v for k, v in variables["params"].items() if not k.startswith("side")}
  final = jax.jit(base.apply)({"params": shared, "batch_stats": variables["batch_stats"]}, x)
  assert len(final) == 1
  np.testing.assert_allclose(final[0], heads[-1], rtol=1e-6)


def test_builders_refuse_unknown_or_conflicting_arguments():
  with pytest.raises(TypeError, match="dropout_rate"):
    models.get_model("resnet50", num_classes=3, dropout_rate=0.5)
  with pytest.raises(ValueError, match="'groups' expected value 32 but got 8"):
    models.get_model("resnext50_32x4d", num_classes=3, groups=8)
  assert models.get_model("resnext50_32x4d", num_classes=3, groups=32).groups == 32


@pytest.mark.parametrize("shape", [(1, 31, 31, 3), (1, 64, 64, 2), (1, 64, 48, 3), (64, 64, 3)])
def test_bad_input_is_a_clear_error(shape):
  model = models.get_model("resnet_tiny", num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match=r"H == W >= 32 and 1 or 3 channels, got shape " + re_shape(shape)):
    model.init(jax.random.PRNGKey(0), jnp.zeros(shape))


def re_shape(shape):
  return r"\(" + ", ".join(map(str, shape)) + r"\)"
