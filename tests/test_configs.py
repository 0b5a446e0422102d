"""Config files, variants and the trainer's validation of bad input."""

import glob
import importlib.util
import json
import os
import re

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
  for key in ("dataset", "channels", "lung_mask", "image_size", "backbone", "model"):
    assert ssl[key] == cpu[key], key


@pytest.mark.parametrize("name,dataset,channels", [
    ("covid19_diag", "covid19_diag", 1), ("covidx_ct", "covidx_ct", 3), ("covid19_ct", "covid19_ct", 3),
    ("sars_cov2_ct", "sars_cov2_ct", 3)])
def test_paper_protocol(name, dataset, channels):
  c = load(name)
  assert (c.dataset, c.channels, c.image_size, c.batch_size) == (dataset, channels, 224, 32)
  assert (c.learning_rate, c.lr_decay_epochs, c.lr_decay_factor, c.num_epochs) == (1e-3, 40, 0.1, 120)
  assert (c.momentum, c.weight_decay, c.model.dsn, c.loss) == (0.9, 5e-4, True, "saal")
  assert tuple(c.model.widths) == (64, 128, 256, 512, 512) and c.model.hidden == 4096


def test_variants_from_the_config_argument():
  c = load("covid19_diag", "baseline,focal,covid_fraction=0.25,seed=3,image_size=128,fold=2,"
           "init_checkpoint=/w/vgg16_bn.pth,widths=8x16x16x32x32")
  assert (c.model.dsn, c.loss, c.covid_fraction, c.seed, c.image_size, c.fold) == (False, "focal", 0.25, 3, 128, 2)
  assert c.init_checkpoint == "/w/vgg16_bn.pth" and tuple(c.model.widths) == (8, 16, 16, 32, 32)
  with pytest.raises(ValueError, match="Unknown config variant 'resnet'.*a backbone .*resnet50"):
    load("covid19_diag", "resnet")
  c = load("covid19_diag", "resnext50_32x4d,baseline,ce")
  assert (c.backbone, c.model.dsn, c.loss) == ("resnext50_32x4d", False, "ce")
  assert load("covid19_diag", "dsn,saal").model.dsn and load("covid19_diag", "model=dsn").model.dsn
  # Keys the schema moved, by their old name (MOVED_KEYS) or their new dotted path.
  c = load("default", "resnet50,width_scale=0.25,la_tau=0.5,model=baseline,meta.every_steps=3,hidden=64")
  assert (c.model.width_scale, c.loss_kwargs.la.tau, c.model.dsn, c.meta.every_steps, c.model.hidden) == (
      0.25, 0.5, False, 3, 64)
  with pytest.raises(ValueError, match="Unknown config variant key 'learing_rate'.*'learning_rate'"):
    load("covid19_diag", "learing_rate=0.1")
  with pytest.raises(ValueError, match="Unknown config.model key 'width'.*'widths'"):
    load("covid19_diag", "model.width=8x8x8x8x8")


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
    (dict(model=dict(hidden=0)), "config.model.hidden must be positive, got 0"),
    (dict(meta=dict(update_rule="bilevel")), "config.meta.update_rule='bilevel' is not one of joint, meta"),
    (dict(loss_kwargs=dict(focal=dict(gama=2.0))), "Unknown config.loss_kwargs.focal key 'gama'.*'gamma'"),
    (dict(backbone="resnet"), "config.backbone='resnet' is not one of .*resnet50"),
    (dict(backbone="resnet50", image_size=16), "config.image_size must be >= 32 for resnet50"),
    (dict(loss="dice"), "config.loss='dice' is not one of saal"),
    (dict(covid_fraction=0.0), r"covid_fraction must be in \(0, 1\]"),
])
def test_bad_values_are_rejected_with_the_key_named(change, message):
  c = load("default")
  c.unlock()
  for k, v in change.items():
    if isinstance(v, dict):  # a nested field
      for name, value in v.items():
        if isinstance(value, dict):
          c[k][name].unlock().update(value)
        else:
          c[k].unlock()[name] = value
    else:
      c[k] = v
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(c, num_devices=8)


def test_launcher_rejects_unknown_override_and_bad_dataset(tmp_path):
  workdir = tmp_path / "work"
  workdir.mkdir()
  cmd = ["train.py", "--config=" + os.path.join(ROOT, "configs", "default.py"), f"--workdir={workdir}"]
  ssl = ["pretrain.py", "--config=" + os.path.join(ROOT, "configs", "pretrain.py"), f"--workdir={workdir}"]
  (tmp_path / "no_slices").mkdir()
  unknown, bad, few, empty, moved = launch_batch.run(
      [cmd + ["--config.learing_rate=0.1"], cmd + ["--config.dataset=covid_ct"], ssl + ["--config.batch_size=2"],
       ssl + [f"--config.pretrain.folder={tmp_path / 'no_slices'}"], cmd + ["--config.saal.update_rule=meta"]],
      tmp_path)  # one process: each alone would pay the imports
  assert moved.returncode == 2 and "Error: config.saal.update_rule is now config.meta.update_rule" in moved.stderr
  assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
  assert unknown.stderr.strip().splitlines()[-1] == ("Error: A --config.KEY override names a field the config does "
                                                     """not have: 'learing_rate' Did you mean "learning_rate" """
                                                     """instead of "learing_rate"?""")
  assert bad.returncode != 0 and "config.dataset='covid_ct' is not one of" in bad.stderr
  assert few.returncode == 2 and "Error: config.batch_size=2 gives SimCLR only 2 negatives" in few.stderr
  assert empty.returncode == 2 and "Error: config.pretrain.folder=" in empty.stderr
  assert "no_slices' has no readable slices" in empty.stderr
  assert not os.listdir(workdir)  # nothing written for a config that cannot run


FIXTURE = os.path.join(ROOT, "tests", "fixtures", "config_before_schema.json")


def plain(config) -> dict:
  """A config as its config.json reads back (tuples as lists)."""
  return json.loads(config.to_json_best_effort())


def test_config_json_from_before_the_schema_change_upgrades_to_todays_values():
  """The fixture: main's base_config (before issue 28's schema) as `covid19_ct:baseline,mwn,...` with meta
  settings, written as train.py writes config.json. Every value lands at its new path; nothing else changes."""
  with open(FIXTURE) as f:
    old = json.load(f)
  want = config_lib.paper_config("covid19_ct", channels=1, lung_mask=True, arg="baseline,mwn,covid_fraction=0.25")
  want.model.widths, want.model.hidden, want.model.dropout_rate = (8, 16, 16, 32, 32), 64, 0.25
  want.loss_kwargs.saal.alpha_param, want.loss_kwargs.focal.gamma, want.loss_kwargs.la.tau = "log10", 3.0, 0.5
  want.meta.update(dict(update_rule="meta", lr=0.01, every_steps=2, fraction=0.2, balanced=True))
  assert config_lib.upgrade(old) == plain(want)
  assert config_lib.upgrade(plain(want)) == plain(want)  # today's schema passes unchanged
  loaded = config_lib.load_saved(FIXTURE)
  config_lib.validate_config(loaded, num_devices=1)
  assert plain(loaded) == plain(want)
  # A partial dict (a checkpoint's inference spec's model entry) moves only what it has.
  assert config_lib.upgrade({"model": "baseline", "widths": [8], "loss": "ce"}) == {
      "model": {"dsn": False, "widths": [8]}, "loss": "ce"}


def test_every_saved_results_config_loads_and_validates():
  paths = sorted(glob.glob(os.path.join(ROOT, "results", "*", "runs", "**", "config.json"), recursive=True))
  assert paths
  for path in paths:
    with open(path) as f:
      saved = json.load(f)
    config = config_lib.load_saved(path)
    config_lib.validate_config(config, num_devices=1)
    assert (config.model.dsn, config.loss, config.backbone) == (
        saved["model"] == "dsn", saved["loss"], saved.get("backbone", "vgg16_bn")), path


def test_a_moved_key_on_the_command_line_names_its_new_path():
  for old, new in config_lib.MOVED_KEYS.items():
    message = config_lib.moved_flag_error(["train.py", "--workdir=w", f"--config.{old}=1"])
    assert message.startswith(f"config.{old} is now config.{new}"), message
  assert config_lib.moved_flag_error(["train.py", "--config.meta.update_rule=meta", "--config.model.dsn=false",
                                      "--config.loss_kwargs.saal.alpha_param=log10"]) is None
  c = load("default")
  with c.unlocked():
    c.la_tau = 2.0  # a config file written for the old schema
  with pytest.raises(ValueError, match=r"config.la_tau is now config.loss_kwargs.la.tau"):
    config_lib.validate_config(c, num_devices=1)


def test_every_config_flag_in_the_docs_and_scripts_names_a_key_of_the_schema():
  """README, docs/, results/ and launch/ commands: each `--config.a.b=` path exists (pretrain's block included)."""
  schema = pretrain.pretrain_config()
  files = [os.path.join(ROOT, "README.md")] + [
      path for pattern in ("docs/*.md", "results/*/*.md", "results/*/*.sh", "launch/*.sh", "benchmarks/*.md")
      for path in glob.glob(os.path.join(ROOT, pattern))]
  seen = set()
  for path in files:
    with open(path) as f:
      for line in f:  # an old name only where the text says what it became
        seen |= {(os.path.relpath(path, ROOT), key) for key in re.findall(r"--config\.([a-z0-9_.]*[a-z0-9_])", line)
                 if not (key in config_lib.MOVED_KEYS and " is now " in line)}
  assert len(seen) > 20
  for where, key in sorted(seen):
    node = schema
    for name in key.split("."):
      assert name in node, f"{where}: --config.{key}"
      node = node[name]
