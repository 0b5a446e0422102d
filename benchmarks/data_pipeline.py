"""Input-pipeline images/s per host core, and the host cores one H100 needs per backbone.

  python benchmarks/data_pipeline.py                      # synthetic 512 px, a 512-px DICOM folder, COVID19-CT
  python benchmarks/data_pipeline.py --sources=covid19_ct --cores=1 --backbones=

Each source is built and prepared at --image_size first (once; cached under
--work_dir), then the train and eval iterators are timed with the process
pinned to 1 core and to 2 cores (`os.sched_setaffinity`, like `taskset -c 0`;
the iterators' worker threads start after it), interleaved over --rounds
rounds, medians printed with the load average. Cores needed: one H100 (989
TFLOP/s bf16 dense) at 40% MFU trains 0.4 * peak / (XLA's FLOPs per image of
the compiled DSN train step at --image_size) images/s; divided by the 1-core
train images per CPU-second (what a core given wholly to the pipeline feeds,
robust to a shared machine; the wall-clock rates are printed beside it).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pydicom
import tensorflow_datasets as tfds
from pydicom.data import get_testdata_file

import dsn_saal_jax
from dsn_saal_jax import config_lib, losses, models, optim, steps as steps_lib
from dsn_saal_jax.data import builders, input_pipeline, phantom

dsn_saal_jax.setup_host()  # the XLA:CPU flag and kernels the trainer runs with, before JAX starts

SOURCES = ("synthetic_512", "dicom_folder", "covid19_ct")
BACKBONES = ("vgg16_bn", "resnet50", "resnext50_32x4d", "densenet169", "mobilenet_v2")  # torchvision's sizes
H100_BF16_TFLOPS = 989.0


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sources", default=",".join(SOURCES),
                      help="Comma-separated, of " + ", ".join(SOURCES) + " (covid19_ct only when present).")
  parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "dsn_saal_jax_data_bench"),
                      help="TFDS data dir and the generated DICOM folder, kept between runs.")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=100, help="Timed training batches (and eval slots / batch).")
  parser.add_argument("--warmup", type=int, default=5, help="Untimed batches first.")
  parser.add_argument("--cores", default="1,2", help="Core counts to pin to, e.g. 1,2.")
  parser.add_argument("--rounds", type=int, default=3, help="Rounds over the core counts; medians reported.")
  parser.add_argument("--synthetic_scale", type=float, default=0.05)
  parser.add_argument("--dicom_per_class", type=int, default=40, help="512-px DICOM slices per class.")
  parser.add_argument("--backbones", default=",".join(BACKBONES),
                      help=f"Backbones whose FLOPs per image to count, of {', '.join(models.list_models())} "
                      "('' = none).")
  parser.add_argument("--mfu", type=float, default=0.4)
  return parser.parse_args()


def write_dicom_folder(root: str, per_class: int, size: int = 512) -> str:
  """`per_class` phantom slices per class as DICOM (HU via slope 1, intercept -1024), one case each."""
  folder = os.path.join(root, f"dicom_{size}px_{per_class}")
  if os.path.isdir(folder):
    return folder
  template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  partial = folder + ".partial"
  for label, name in enumerate(phantom.CLASS_NAMES):
    os.makedirs(os.path.join(partial, name), exist_ok=True)
    for i in range(per_class):
      hu, _ = phantom.chest_slice(np.random.default_rng([label, i]), size, label)
      template.Rows, template.Columns = hu.shape
      template.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
      template.save_as(os.path.join(partial, name, f"case{i:03d}.dcm"))
  os.rename(partial, folder)
  return folder


def source_config(source: str, args: argparse.Namespace) -> ml_collections.ConfigDict | None:
  config = config_lib.base_config()
  config.update(dict(data_dir=os.path.join(args.work_dir, "tfds"), image_size=args.image_size,
                     channels=args.channels, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                     lung_mask=False))
  if source == "synthetic_512":
    config.update(dict(dataset="synthetic_ct", synthetic_scale=args.synthetic_scale, synthetic_image_size=512))
  elif source == "dicom_folder":
    config.update(dict(dataset="image_folder", manual_dir=write_dicom_folder(args.work_dir, args.dicom_per_class)))
  elif source == "covid19_ct":
    if not builders.default_manual_dir("covid19_ct"):
      return None
    config.dataset = "covid19_ct"
  else:
    raise ValueError(f"Unknown source {source!r}; choose from {', '.join(SOURCES)}.")
  return config


def images_per_second(batches, count: int, warmup: int) -> tuple[float, float]:
  """(images per second, images per CPU-second of this process) over `count` batches after `warmup`.

  Images are slots, padding included. The CPU-second rate is what a core given wholly to the
  pipeline would feed, whatever else shares the machine.
  """
  for _ in itertools.islice(batches, warmup):
    pass
  start, cpu, images = time.perf_counter(), time.process_time(), 0
  for batch in itertools.islice(batches, count):
    images += batch["label"].size
  return images / (time.perf_counter() - start), images / (time.process_time() - cpu)


def measure(ds: input_pipeline.Dataset, cores: int, args: argparse.Namespace) -> list[float]:
  """[train, eval] x [images/s, images per CPU-second] with this process pinned to `cores` cores."""
  allowed = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, allowed[:cores])
  try:
    train_rates = images_per_second(ds.train_iter(), args.steps, args.warmup)
    split = next(iter(ds.info.num_eval))
    evals = itertools.chain.from_iterable(ds.eval_iter(split) for _ in itertools.count())
    eval_rates = images_per_second(evals, args.steps, args.warmup)
  finally:
    os.sched_setaffinity(0, allowed)
  return [*train_rates, *eval_rates]


def train_flops_per_image(backbone: str, image_size: int, channels: int, batch: int = 8) -> float:
  """XLA's FLOP count of the DSN train step (as benchmarks/train_step.py counts it) / batch."""
  config = config_lib.base_config()
  config.backbone, config.image_size, config.batch_size, config.channels = backbone, image_size, batch, channels
  counts = np.array([234, 191])
  model = models.create_model(config, len(counts))
  optimizer = optim.make_optimizer(config, 100)
  state = steps_lib.create_train_state(config, model, (image_size, image_size, channels), optimizer,
                                       jax.random.PRNGKey(0))
  step = functools.partial(steps_lib.train_step, model=model, loss_fn=losses.make_loss_fn(config, counts),
                           optimizer=optimizer, learning_rate_fn=optim.make_lr_schedule(config, 100))
  batch_arrays = {"image": np.zeros((batch, image_size, image_size, channels), np.float32),
                  "label": np.zeros(batch, np.int32)}
  add = lambda x: jnp.asarray(x)[None]
  lowered = jax.jit(jax.vmap(step, axis_name=steps_lib.AXIS, in_axes=(0, 0, None))).lower(
      jax.tree_util.tree_map(add, state), jax.tree_util.tree_map(add, batch_arrays), jax.random.PRNGKey(1))
  analysis = lowered.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"]) / batch


def main() -> None:
  args = parse_args()
  tfds.disable_progress_bar()
  os.makedirs(args.work_dir, exist_ok=True)
  core_counts = [int(c) for c in args.cores.split(",")]
  if max(core_counts) > len(os.sched_getaffinity(0)):
    raise SystemExit(f"Error: --cores={args.cores} asks for more than the {len(os.sched_getaffinity(0))} "
                     "core(s) this process may use (taskset?); lower it.")
  print(f"{os.cpu_count()} CPUs, {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch_size}, "
        f"{args.steps} timed batches after {args.warmup}")
  per_core = {}
  for source in args.sources.split(","):
    config = source_config(source, args)
    if config is None:
      print(f"{source}: absent, skipped")
      continue
    start = time.perf_counter()
    ds = input_pipeline.create_dataset(config)
    print(f"{source}: {ds.info.num_train} training images, ready in {time.perf_counter() - start:.1f} s "
          "(a build and a prepared variant included when absent)")
    rates = {cores: [] for cores in core_counts}
    for _ in range(args.rounds):  # interleaved, so every core count sees the same machine load
      for cores in core_counts:
        rates[cores].append(measure(ds, cores, args))
    for cores in core_counts:
      train_rate, train_cpu, eval_rate, eval_cpu = np.median(rates[cores], axis=0)
      print(f"  {cores} core(s): train {train_rate:6.0f} images/s ({train_rate / cores:5.0f} per core, "
            f"{train_cpu:5.0f} per CPU-s), eval {eval_rate:6.0f} images/s ({eval_rate / cores:5.0f} per core, "
            f"{eval_cpu:5.0f} per CPU-s); medians of {args.rounds}, load average {os.getloadavg()[0]:.1f}")
      if cores == 1:
        per_core[source] = train_cpu
  backbones = [b for b in args.backbones.split(",") if b]
  if not backbones or not per_core:
    return
  needed_at = args.mfu * H100_BF16_TFLOPS * 1e12
  print(f"Host cores per H100 ({H100_BF16_TFLOPS:.0f} TFLOP/s bf16 dense) at {args.mfu:.0%} MFU, "
        f"{args.image_size} px, from the 1-core train images per CPU-second:")
  print(f"  {'backbone':16s} {'GFLOP/img':>9s} {'img/s':>8s}  " + "  ".join(f"{s:>13s}" for s in per_core))
  for backbone in backbones:
    flops = train_flops_per_image(backbone, args.image_size, args.channels)
    rate = needed_at / flops
    print(f"  {backbone:16s} {flops / 1e9:9.1f} {rate:8.0f}  "
          + "  ".join(f"{rate / r:13.1f}" for r in per_core.values()))


if __name__ == "__main__":
  main()
