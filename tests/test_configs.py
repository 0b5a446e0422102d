"""Config files, variants and the trainer's validation of bad input."""

import glob
import importlib.util
import os

import pytest

import launch_batch

from dsn_saal_jax import config_lib, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_file_is_valid(path):
  name = os.path.basename(path)[:-3]
  config = load(name)
  if name.startswith("pretrain"):  # the trainer's checks on the shared fields, then the method's
    pretrain.validate(config, num_devices=1)
  else:
    config_lib.validate_config(config, num_devices=1)


def test_the_covid19_ct_pretraining_fits_the_cpu_budget_config():
  ssl, cpu = load("pretrain_covid19_ct"), load("covid19_ct_cpu")
  for key in ("dataset", "channels", "lung_mask", "image_size", "backbone", "widths", "stages", "width_scale"):
    assert ssl[key] == cpu[key], key


@pytest.mark.parametrize("name,dataset,channels", [
    ("covid19_diag", "covid19_diag", 1), ("covidx_ct", "covidx_ct", 3), ("covid19_ct", "covid19_ct", 3),
    ("sars_cov2_ct", "sars_cov2_ct", 3)])
def test_paper_protocol(name, dataset, channels):
  c = load(name)
  assert (c.dataset, c.channels, c.image_size, c.batch_size) == (dataset, channels, 224, 32)
  assert (c.learning_rate, c.lr_decay_epochs, c.lr_decay_factor, c.num_epochs) == (1e-3, 40, 0.1, 120)
  assert (c.momentum, c.weight_decay, c.model, c.loss) == (0.9, 5e-4, "dsn", "saal")
  assert tuple(c.widths) == (64, 128, 256, 512, 512) and c.hidden == 4096


def test_variants_from_the_config_argument():
  c = load("covid19_diag", "baseline,focal,covid_fraction=0.25,seed=3,image_size=128,fold=2,"
           "init_checkpoint=/w/vgg16_bn.pth,widths=8x16x16x32x32")
  assert (c.model, c.loss, c.covid_fraction, c.seed, c.image_size, c.fold) == ("baseline", "focal", 0.25, 3, 128, 2)
  assert c.init_checkpoint == "/w/vgg16_bn.pth" and tuple(c.widths) == (8, 16, 16, 32, 32)
  with pytest.raises(ValueError, match="Unknown config variant 'resnet'.*a backbone .*resnet50"):
    load("covid19_diag", "resnet")
  c = load("covid19_diag", "resnext50_32x4d,baseline,ce")
  assert (c.backbone, c.model, c.loss) == ("resnext50_32x4d", "baseline", "ce")
  with pytest.raises(ValueError, match="Unknown config variant key 'learing_rate'.*'learning_rate'"):
    load("covid19_diag", "learing_rate=0.1")


def test_dataset_names_match_the_data_layer():
  from dsn_saal_jax.data import builders  # pylint: disable=g-import-not-at-top
  assert set(config_lib.DATASETS) == set(builders.BUILDERS)


@pytest.mark.parametrize("change,message", [
    (dict(learing_rate=0.1), "Unknown config key 'learing_rate'. Did you mean 'learning_rate'"),
    (dict(dataset="covid_ct"), "config.dataset='covid_ct' is not one of synthetic_ct"),
    (dict(learning_rate=0.0), "config.learning_rate must be positive, got 0.0"),
    (dict(learning_rate=-1e-3), "config.learning_rate must be positive"),
    (dict(batch_size=30), r"config.batch_size=30 is not divisible by the 8 devices; .*--config.batch_size=24"),
    (dict(eval_batch_size=12), "config.eval_batch_size=12 is not divisible by the 8 devices"),
    (dict(model="resnet"), "config.model='resnet' is not one of dsn, baseline"),
    (dict(backbone="resnet"), "config.backbone='resnet' is not one of .*resnet50"),
    (dict(backbone="resnet50", image_size=16), "config.image_size must be >= 32 for resnet50"),
    (dict(loss="dice"), "config.loss='dice' is not one of saal"),
    (dict(covid_fraction=0.0), r"covid_fraction must be in \(0, 1\]"),
])
def test_bad_values_are_rejected_with_the_key_named(change, message):
  c = load("default")
  c.unlock()
  for k, v in change.items():
    c[k] = v
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(c, num_devices=8)


def test_launcher_rejects_unknown_override_and_bad_dataset(tmp_path):
  workdir = tmp_path / "work"
  workdir.mkdir()
  cmd = ["train.py", "--config=" + os.path.join(ROOT, "configs", "default.py"), f"--workdir={workdir}"]
  ssl = ["pretrain.py", "--config=" + os.path.join(ROOT, "configs", "pretrain.py"), f"--workdir={workdir}"]
  (tmp_path / "no_slices").mkdir()
  unknown, bad, few, empty = launch_batch.run(
      [cmd + ["--config.learing_rate=0.1"], cmd + ["--config.dataset=covid_ct"], ssl + ["--config.batch_size=2"],
       ssl + [f"--config.pretrain.folder={tmp_path / 'no_slices'}"]], tmp_path)  # one process: each alone would pay the imports
  assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
  assert unknown.stderr.strip().splitlines()[-1] == ("Error: A --config.KEY override names a field the config does "
                                                     """not have: 'learing_rate' Did you mean "learning_rate" """
                                                     """instead of "learing_rate"?""")
  assert bad.returncode != 0 and "config.dataset='covid_ct' is not one of" in bad.stderr
  assert few.returncode == 2 and "Error: config.batch_size=2 gives SimCLR only 2 negatives" in few.stderr
  assert empty.returncode == 2 and "Error: config.pretrain.folder=" in empty.stderr
  assert "no_slices' has no readable slices" in empty.stderr
  assert not os.listdir(workdir)  # nothing written for a config that cannot run
