"""launch/convert_torchvision.py: a torchvision vgg16_bn file -> a checkpoint the trainer merges."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="converting torchvision weights needs the `test` extra (CPU torch)")

from conftest import init_variables  # noqa: E402
from dsn_saal_jax import convert, models  # noqa: E402
from dsn_saal_jax.torch_reference import DSNVGG16BNTorch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_converter(*args):
  return subprocess.run([sys.executable, str(ROOT / "launch" / "convert_torchvision.py"), *args],
                        capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
  """A state_dict with torchvision vgg16_bn's exact keys and shapes (our reference, dsn=False, 1000 classes)."""
  torch.manual_seed(0)
  sd = DSNVGG16BNTorch(1000, in_channels=3, dsn=False).state_dict()
  path = tmp_path_factory.mktemp("tv") / "vgg16_bn.pth"
  torch.save(sd, path)
  return path, {k: v.numpy() for k, v in sd.items()}


def test_gray_input_and_new_classes(torchvision_file, tmp_path):
  path, sd = torchvision_file
  out = tmp_path / "gray"
  result = run_converter(f"--weights={path}", f"--output={out}", "--in_channels=1", "--num_classes=3")
  assert result.returncode == 0, result.stderr
  pretrained = convert.load_pretrained(out)
  p = pretrained["params"]
  assert "fc8" not in p  # 1000 -> 3 classes: re-initialised by the trainer
  np.testing.assert_array_equal(p["conv1_1"]["kernel"][..., 0, :], sd["features.0.weight"].sum(1).transpose(1, 2, 0))
  np.testing.assert_array_equal(p["fc7"]["kernel"], sd["classifier.3.weight"].T)
  np.testing.assert_array_equal(pretrained["batch_stats"]["bn5_3"]["var"], sd["features.41.running_var"])

  model = models.DSNVGG16BN(num_classes=3)
  fresh = init_variables(model, (1, 32, 32, 1))
  merged = convert.merge_pretrained(fresh, pretrained, str(out))
  np.testing.assert_array_equal(merged["params"]["conv3_2"]["kernel"], p["conv3_2"]["kernel"])
  for kept in (("side2", "fuse", "kernel"), ("fc8", "kernel")):
    a, b = merged["params"], fresh["params"]
    for k in kept:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(a, b)
  # The merged network computes what the torchvision network computes on gray images replicated to RGB.
  tmodel = DSNVGG16BNTorch(1000, in_channels=3, dsn=False).eval()
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  x = np.random.RandomState(0).rand(1, 64, 64, 1).astype(np.float32)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(np.repeat(x, 3, -1).transpose(0, 3, 1, 2)))[-1].numpy()
  base = models.DSNVGG16BN(num_classes=1000, dsn=False)
  variables = convert.merge_pretrained(jax.eval_shape(lambda: base.init(jax.random.PRNGKey(0), x)),
                                       convert.torchvision_variables(sd, "vgg16_bn", in_channels=1))
  got = jax.jit(base.apply)(variables, x)[-1]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_mismatched_checkpoint_is_refused(torchvision_file, tmp_path):
  path, _ = torchvision_file
  out = tmp_path / "rgb"
  assert run_converter(f"--weights={path}", f"--output={out}", "--num_classes=1000").returncode == 0
  gray_model = models.DSNVGG16BN(num_classes=3)
  fresh = jax.eval_shape(lambda: gray_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1))))
  with pytest.raises(ValueError, match=r"conv1_1/kernel has shape \(3, 3, 3, 64\), the model needs \(3, 3, 1, 64\).*"
                                       r"fc8/kernel has shape \(4096, 1000\)"):
    convert.merge_pretrained(fresh, convert.load_pretrained(out), str(out))


def test_converter_refuses_pickled_code(tmp_path):
  evil = tmp_path / "evil.pth"
  evil.write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
  result = run_converter(f"--weights={evil}", f"--output={tmp_path / 'out'}")
  assert result.returncode != 0
  assert "evil.pth is not a plain tensor state_dict" in result.stderr
  assert "pwned" not in result.stdout and not (tmp_path / "out").exists()
