"""Every backbone trains, reports and predicts through the same code: nothing downstream names VGG.

The registered tiny variants (same families, a few channels) stand in for the
full-size ones, whose numbers `test_models_<family>.py` check against PyTorch.
"""

import csv
import json
import os
from concurrent import futures

import jax
import numpy as np
import pytest
from PIL import Image

import launch_batch
from conftest import HERE
from helpers import blobs, tiny_config, tiny_dataset

from dsn_saal_jax import checkpointing, models, predict, runtime, train

ROOT = os.path.dirname(HERE)
# resnet_tiny trains, reports and predicts through the launchers (the module's last test), the others here.
TINY = ("densenet_tiny", "mobilenet_v2_tiny")


def check_run(workdir, backbone: str, num_examples: int):
  """What every backbone's run must hold: its report, five side heads' losses, the parameter count of the
  model its checkpoint's spec describes, and Grad-CAM from that checkpoint alone. Returns (metrics, predictor)."""
  report = workdir / "report" / "test"
  metrics = json.loads((report / "metrics.json").read_text())
  assert metrics["backbone"] == backbone and metrics["num_examples"] == num_examples
  assert (report / "gradcam.png").stat().st_size > 0
  history = runtime.read_history(str(workdir))
  assert len([k for k in history if k.startswith("train/loss_side")]) == 5  # five side heads, then final

  predictor = predict.Predictor.from_workdir(str(workdir), "best")  # the checkpoint's spec alone
  assert predictor.spec["model"]["backbone"] == backbone
  model = predict._model(predictor.spec)  # pylint: disable=protected-access
  shapes = jax.eval_shape(model.init, jax_key(), np.zeros((1, 32, 32, 1)))  # no eager init: no compiles
  assert metrics["num_params"] == models.count_params(shapes["params"]) > 0
  return metrics, predictor


def check_grad_cam(predictor, x, probs):
  cams = predictor.grad_cam(x[:2], np.argmax(probs[:2], -1))
  # Normalized to a maximum of 1, or all 0 where the class evidence at the CAM layer is negative.
  assert cams.shape == (2, 32, 32) and np.all((cams >= 0) & (cams <= 1)) and np.max(cams) in (0, 1)


def launch_resnet_tiny(tmp_path):
  """train.py on the embedded default with resnet_tiny, then predict.py on 3 PNG slices, one after the other in
  one process (JAX is imported once): (train result, predict result, workdir, predictions CSV)."""
  workdir = tmp_path / "work"
  overrides = dict(data_dir=tmp_path / "data", synthetic_scale=0.01, synthetic_image_size=32, image_size=32,
                   num_train_steps=3, batch_size=16, eval_batch_size=16, log_every_steps=3, gradcam_per_class=1)
  slices = tmp_path / "slices"
  slices.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(slices / f"slice{i}.png")
  out = tmp_path / "predictions.csv"
  trained, predicted = launch_batch.run([
      ["train.py", f"--config={ROOT}/configs/default.py:resnet_tiny", f"--workdir={workdir}",
       *[f"--config.{k}={v}" for k, v in overrides.items()]],
      ["predict.py", f"--workdir={workdir}", f"--output={out}", str(slices)]], tmp_path)
  return trained, predicted, workdir, out


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
  """launch_resnet_tiny's future: the launches run in a background thread, alongside the in-process tests
  (the tiny backbones train here meanwhile: compiles and imports are mostly single-threaded, 2 cores)."""
  with futures.ThreadPoolExecutor(1) as pool:  # leaving the block waits for it
    yield pool.submit(launch_resnet_tiny, tmp_path_factory.mktemp("launched"))


@pytest.mark.parametrize("backbone", TINY)
def test_tiny_backbone_trains_reports_and_predicts_from_its_checkpoint_alone(tmp_path, backbone, launched):
  del launched  # requested only to start the launches first, so they run alongside this training
  c = tiny_config(backbone=backbone, num_train_steps=4, gradcam_per_class=1)
  train.train_and_evaluate(c, str(tmp_path), dataset=tiny_dataset(c))
  metrics, predictor = check_run(tmp_path, backbone, 29)
  x, y = blobs(29, 2)
  probs = predictor.predict_inputs(x)
  assert np.mean(np.argmax(probs, -1) == y) == metrics["accuracy"]
  check_grad_cam(predictor, x, probs)


def jax_key():
  return jax.random.PRNGKey(0)


def test_checkpoints_from_before_backbones_existed_load_as_vgg16_bn():
  from dsn_saal_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  old_fingerprint = {k: v for k, v in checkpointing.model_fingerprint(c, 3).items() if k != "backbone"}
  assert checkpointing.fingerprint_differences(old_fingerprint, checkpointing.model_fingerprint(c, 3)) == []
  c.backbone = "resnet50"
  assert checkpointing.fingerprint_differences(old_fingerprint, checkpointing.model_fingerprint(c, 3)) == [
      "backbone: checkpoint 'vgg16_bn' vs config 'resnet50'"]
  old_spec = {"class_names": ["a", "b", "c"], "model": {
      "model": "dsn", "widths": [8, 16, 16, 32, 32], "stages": [2, 2, 3, 3, 3], "hidden": 64, "fuse_channels": 1,
      "dropout_rate": 0.5, "loss": "saal"}}
  model = predict._model(old_spec)  # pylint: disable=protected-access
  assert isinstance(model, models.DSNVGG16BN) and model.widths == (8, 16, 16, 32, 32) and model.num_heads == 6


def test_unknown_backbone_and_too_small_input_are_clear_errors():
  with pytest.raises(ValueError, match=r"Unknown backbone 'resnet'; choose one of \[.*'resnet50'"):
    models.get_model("resnet", num_classes=3)
  model = models.get_model("resnet_tiny", num_classes=3)
  with pytest.raises(ValueError, match=r"expects NHWC input with H == W >= 32 .* got shape \(1, 16, 16, 1\)"):
    model.init(jax_key(), np.zeros((1, 16, 16, 1), np.float32))


def test_weights_of_another_architecture_are_refused_naming_the_right_one():
  torch = pytest.importorskip("torch", reason="needs the `test` extra (CPU torch)")
  from dsn_saal_jax import convert  # pylint: disable=g-import-not-at-top
  from dsn_saal_jax.torch_reference import TORCH_MODELS  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  sd = {k: v.numpy() for k, v in TORCH_MODELS["resnext50_32x4d"](1000, in_channels=3, dsn=False).state_dict().items()}
  assert convert.guess_architectures(sd) == ["resnext50_32x4d"]  # same keys as resnet50; the shapes decide
  with pytest.raises(ValueError, match=r"not torchvision's resnet50: they have the keys and shapes of "
                                       r"resnext50_32x4d; pass --arch=resnext50_32x4d \(choices: .*vgg16_bn[,)]"):
    convert.torchvision_variables(sd, "resnet50", in_channels=1, num_classes=3)
  with pytest.raises(ValueError, match=r"not torchvision's vgg16_bn: .* of resnext50_32x4d"):
    convert.torchvision_variables(sd, "vgg16_bn")



@pytest.mark.parametrize("backbone, narrowed", [
    ("resnet50", dict(width=16)), ("resnext50_32x4d", dict(width=16, groups=32, width_per_group=4)),
    ("densenet169", dict(growth_rate=8, num_init_features=16)), ("mobilenet_v2", dict(width_mult=0.25))])
def test_width_scale_narrows_the_backbone_and_is_part_of_the_fingerprint(backbone, narrowed):
  """config.model.width_scale (for CPU-budget studies) reaches the builder; a checkpoint of another width is refused."""
  from dsn_saal_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.backbone, c.model.width_scale = backbone, 0.25
  config_lib.validate_config(c, 1)
  model = models.create_model(c, 3)
  assert {k: getattr(model, k) for k in narrowed} == narrowed
  full_config, narrow_config = config_lib.base_config(), config_lib.base_config()
  full_config.backbone = narrow_config.backbone = backbone
  narrow_config.model.width_scale = 0.25
  full = checkpointing.model_fingerprint(full_config, 3)
  narrow = checkpointing.model_fingerprint(narrow_config, 3)
  assert checkpointing.fingerprint_differences(full, narrow) == ["width_scale: checkpoint 1.0 vs config 0.25"]
  legacy = {k: v for k, v in full.items() if k != "width_scale"}  # written before width_scale existed
  assert checkpointing.fingerprint_differences(legacy, full) == []


def test_width_scale_on_vgg_points_to_widths():
  from dsn_saal_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.width_scale = 0.5
  with pytest.raises(ValueError, match=r"config.model.width_scale=0.5 does not apply to vgg16_bn; narrow it with "
                                       r"config.model.widths instead"):
    config_lib.validate_config(c, 1)


def test_train_and_predict_launchers_on_the_embedded_default_with_another_backbone(launched):
  trained, predicted, workdir, out = launched.result()
  assert trained.returncode == 0, trained.stderr[-4000:]
  _, predictor = check_run(workdir, "resnet_tiny", 20)  # 11 + 4 + 5 test slices

  assert predicted.returncode == 0, predicted.stderr[-4000:]
  rows = list(csv.DictReader(out.open()))
  assert len(rows) == 3 and "3 predicted, 0 failed" in predicted.stdout
  x = np.stack([predictor.load(r["path"]) for r in rows])
  probs = predictor.predict_inputs(x)  # the CSV's probabilities are those of the checkpoint in this process
  np.testing.assert_allclose([[float(r[f"prob_{n}"]) for n in predictor.class_names] for r in rows], probs,
                             atol=1e-5)
  check_grad_cam(predictor, x, probs)
