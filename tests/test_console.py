"""The console a person reads and the GPU/TPU-scale check.

The launcher tests run the real main job (launch/train.py on configs/default.py,
fewer epochs) in a subprocess and read its console, stdout and stderr
interleaved as a terminal shows them.
"""

import importlib.util
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging as absl_logging

from dsn_saal_jax import config_lib, console, models, runtime, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_EPOCHS = 15  # configs/default.py's num_epochs
CONSOLE_LINES = 40   # what the whole default run may print


def launch_default(tmp_path, workdir, *flags):
  """launch/train.py --config=configs/default.py into `workdir`; its console as a list of lines."""
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={ROOT}/configs/default.py",
       f"--workdir={workdir}", f"--config.data_dir={tmp_path / 'data'}", *flags],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-4000:]
  return proc.stdout.splitlines()


@pytest.fixture(scope="module")
def consoles(tmp_path_factory):
  """Consoles of the default job: 1 epoch, then its resumption to 2 at --verbosity=1."""
  tmp = tmp_path_factory.mktemp("console")
  first = launch_default(tmp, tmp / "work", "--config.num_epochs=1")
  resumed = launch_default(tmp, tmp / "work", "--config.num_epochs=2", "--verbosity=1")
  return {"first": first, "resumed": resumed, "workdir": tmp / "work"}


def epoch_lines(lines):
  return [line for line in lines if re.search(r"\] epoch \d+/\d+ \(step \d+/\d+\): loss ", line)]


def test_default_console_is_a_few_start_lines_one_line_per_epoch_and_the_test_metrics(consoles):
  lines = consoles["first"]
  epochs = epoch_lines(lines)
  assert [re.search(r"epoch (\d+/\d+)", e).group(1) for e in epochs] == ["1/1"]
  for e in epochs:  # step, epoch, loss, accuracy, validation metric, best so far, speed, ETA
    assert re.search(r"\(step \d+/15\): loss [\d.]+, accuracy [\d.]+; validation macro_f1 [\d.]+ "
                     r"\(best [\d.]+ at step \d+\); \d+ ex/s, ETA \d+:\d\d:\d\d$", e), e
  # The full 15-epoch run adds one line per epoch and must stay within CONSOLE_LINES.
  assert len(lines) - len(epochs) + DEFAULT_EPOCHS <= CONSOLE_LINES, "\n".join(lines)
  text = "\n".join(lines)
  assert "JAX backend cpu: 1 device (process 0 of 1)." in text
  assert "synthetic_ct: 3 classes" in text and "tensorboard --logdir=" in text
  report = [line for line in lines if str(consoles["workdir"] / "report" / "test") in line]
  assert len(report) == 1 and "macro_f1=" in report[0] and "auc=" in report[0]
  for chatter in ("checkpoint_manager.py", "async_checkpointer.py", "oneDNN", "xla_bridge.py", "config:",
                  "Generating splits", "GPU/TPU scale"):
    assert chatter not in text


def tensorboard_scalars(logdir) -> dict[str, tuple[list[int], list[float]]]:
  """{tag: (steps, values)} of the scalar-plugin summaries in `logdir`'s event files, the last per step."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  files = sorted(str(p) for p in logdir.glob("events.out.tfevents*"))  # named by start time: oldest first
  assert files, f"no event files in {logdir}"
  series: dict[str, dict[int, float]] = {}
  for record in tf.data.TFRecordDataset(files):
    event = event_pb2.Event.FromString(record.numpy())
    for value in event.summary.value:
      assert value.metadata.plugin_data.plugin_name == "scalars", value.tag  # what TensorBoard plots
      series.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return {tag: (sorted(points), [points[k] for k in sorted(points)]) for tag, points in series.items()}


def test_tensorboard_events_hold_the_same_scalars_as_the_history(consoles):
  """The default job (and its resumption) logs every scalar to TensorBoard, as to history.jsonl."""
  history = runtime.read_history(str(consoles["workdir"]))
  events = tensorboard_scalars(consoles["workdir"] / "tensorboard")
  assert set(events) == set(history) and {"train/alpha", "validation/macro_f1", "test/auc"} <= set(events)
  for name, (steps, values) in history.items():
    assert events[name][0] == list(steps), name
    np.testing.assert_allclose(events[name][1], values, rtol=1e-6, err_msg=name)
  assert list(history["train/loss"][0]) == [15, 30]  # both runs' epochs are in both


def test_a_resumed_run_says_so_by_default(consoles):
  resumed = [line for line in consoles["resumed"] if "Resumed from" in line]
  assert len(resumed) == 1 and f"Resumed from {consoles['workdir'] / 'checkpoints'} at step 15." in resumed[0]
  # An INFO line of the project's own, which the console shows at the default verbosity (filter test below).
  assert re.match(r"I\d{4} [\d:.]+ +\d+ train\.py:\d+\] Resumed", resumed[0]), resumed[0]
  assert [re.search(r"epoch (\d+/\d+)", e).group(1) for e in epoch_lines(consoles["resumed"])] == ["2/2"]


def test_verbosity_1_adds_every_logged_step_the_config_and_the_libraries_info_lines(consoles):
  verbose = "\n".join(consoles["resumed"])  # one epoch, like the first run
  assert len(consoles["resumed"]) > 3 * len(consoles["first"])
  assert "config:" in verbose and "step 30/30 (epoch 2.00): loss" in verbose
  assert "checkpoint_manager.py" in verbose  # orbax


def test_argv_verbosity_reads_the_flag_as_absl_does():
  assert console.argv_verbosity(["train.py", "--workdir=/w"]) == 0
  assert console.argv_verbosity(["train.py", "--verbosity=1"]) == 1
  assert console.argv_verbosity(["train.py", "-v", "2", "--workdir=/w"]) == 2
  assert console.argv_verbosity(["train.py", "--v=-1"]) == -1
  assert console.argv_verbosity(["train.py", "--verbosity=1", "--verbosity=0"]) == 0  # the last one wins
  assert console.argv_verbosity(["predict.py", "--", "-v=3"]) == 0  # after "--", a file name
  assert console.argv_verbosity(["train.py", "--verbosity=loud"]) == 0  # absl reports it


@pytest.mark.parametrize("verbosity, passed", [
    (0, {"own INFO", "own WARNING", "library WARNING"}),
    (1, {"own DEBUG", "own INFO", "own WARNING", "library INFO", "library WARNING"}),
    (-1, {"own WARNING"}),
])
def test_the_filter_gives_libraries_one_level_less_than_the_project(verbosity, passed):
  own_file = os.path.join(os.path.dirname(train.__file__), "train.py")
  library_file = os.path.join(os.path.dirname(jax.__file__), "_src", "xla_bridge.py")
  records = {f"{who} {logging.getLevelName(level)}": logging.LogRecord("absl", level, path, 1, "m", None, None)
             for who, path in (("own", own_file), ("library", library_file))
             for level in (logging.DEBUG, logging.INFO, logging.WARNING)}
  keep = console._ConsoleFilter((os.path.dirname(train.__file__) + os.sep,))  # pylint: disable=protected-access
  before, logger_level = absl_logging.get_verbosity(), absl_logging.get_absl_logger().level
  absl_logging.set_verbosity(verbosity)
  try:
    assert {name for name, record in records.items() if keep.filter(record)} == passed
  finally:  # set_verbosity pins the absl logger's level; later tests' caplog needs it unset again
    absl_logging.set_verbosity(before)
    absl_logging.get_absl_logger().setLevel(logger_level)


def test_paper_configs_are_gpu_scale_and_the_default_is_not():
  def flops(config, num_train):
    model = models.create_model(config, 3, axis_name=None)
    shape = (config.image_size, config.image_size, config.channels)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    steps = config.num_epochs * (num_train // config.batch_size)
    return runtime.training_flops(config, model, variables, shape, steps), steps * config.batch_size

  # COVID19-CT's official train split: 191 COVID + 234 non-COVID slices.
  paper, examples = flops(config_lib.paper_config("covid19_ct", channels=3, lung_mask=False, arg=None), 425)
  # Independent count: VGG16-BN at 224 px is 15.5 G multiply-adds (torchvision's table), 2 FLOPs each.
  assert paper / (3 * examples) == pytest.approx(2 * 15.5e9, rel=0.1)
  assert paper > runtime.CPU_SCALE_FLOPS
  spec = importlib.util.spec_from_file_location("default_config", os.path.join(ROOT, "configs", "default.py"))
  default = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(default)
  assert flops(default.get_config(), 491)[0] < runtime.CPU_SCALE_FLOPS / 100  # synthetic_ct: 491 train slices
