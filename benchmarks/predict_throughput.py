"""Inference throughput of `dsn_saal_jax.predict` at 224x224, in images per second.

  python benchmarks/predict_throughput.py                       # 512 px DICOM slices, batch 16 and 32
  python benchmarks/predict_throughput.py --format=png --batch_sizes=32

A full-width DSN-VGG16-BN (134.4 M parameters) with random weights, served by
the same `Predictor` as launch/predict.py. Reports, per batch size: reading +
preprocessing alone (decode, HU window, lung mask, resize, normalize), the
forward pass alone, and both together (`predict_files`), after one untimed
batch that compiles the forward pass.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

import dsn_saal_jax
from dsn_saal_jax import config_lib, models, predict, steps as steps_lib
from dsn_saal_jax.data import ct, phantom

dsn_saal_jax.setup_host()  # the XLA:CPU flag and kernels the trainer runs with, before JAX starts


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_sizes", default="16,32", help="Comma-separated batch sizes.")
  parser.add_argument("--batches", type=int, default=2, help="Timed batches per batch size.")
  parser.add_argument("--format", default="dcm", choices=("dcm", "png"))
  parser.add_argument("--source_size", type=int, default=512, help="Side of the generated slices.")
  parser.add_argument("--image_size", type=int, default=224)
  return parser.parse_args()


def write_slices(folder: str, n: int, size: int, fmt: str) -> list[str]:
  """`n` phantom chest slices of the three classes as DICOM (CT_small.dcm's header) or 8-bit PNG."""
  template = get_testdata_file("CT_small.dcm")
  paths = []
  for i in range(n):
    hu = phantom.chest_slice(np.random.default_rng(i), size, i % 3)[0]
    path = os.path.join(folder, f"slice{i:04d}.{fmt}")
    if fmt == "dcm":
      ds = pydicom.dcmread(template)
      ds.Rows, ds.Columns = hu.shape
      ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
      ds.save_as(path)
    else:
      Image.fromarray(ct.window(hu)).save(path)
    paths.append(path)
  return paths


def timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main() -> None:
  args = parse_args()
  config = config_lib.base_config()  # Full-width DSN-VGG16-BN, SAAL, synthetic_ct's classes.
  config.image_size = args.image_size
  spec = predict.spec_from_config(config)
  model = models.create_model(config, len(spec["class_names"]), axis_name=None)
  variables = steps_lib.init_variables(config, model, (args.image_size, args.image_size, 1), jax.random.PRNGKey(0))
  print(f"DSN-VGG16-BN, {sum(x.size for x in jax.tree_util.tree_leaves(variables['params'])):,} params, "
        f"{args.image_size}x{args.image_size}x1, {args.format} sources {args.source_size}x{args.source_size}, "
        f"{jax.devices()[0].platform} x{jax.device_count()}, load average {os.getloadavg()[0]:.1f}")
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  with tempfile.TemporaryDirectory() as folder:
    paths = write_slices(folder, max(batch_sizes) * (args.batches + 1), args.source_size, args.format)
    for batch in batch_sizes:
      predictor = predict.Predictor(spec, variables, batch_size=batch)
      warm, timed_paths = paths[:batch], paths[batch:batch * (args.batches + 1)]
      predictor.predict_files(warm)  # Compiles the forward pass and traces the preprocessing.
      n = len(timed_paths)
      t_pre = timed(lambda: np.stack([predictor.load(p) for p in timed_paths]))
      inputs = np.stack([predictor.load(p) for p in timed_paths])
      t_fwd = timed(predictor.predict_inputs, inputs)
      t_all = timed(lambda: [r.probs for r in predictor.predict_files(timed_paths)])
      print(f"batch {batch:3d}: preprocess {n / t_pre:7.1f} img/s | forward {n / t_fwd:6.2f} img/s | "
            f"preprocess + forward {n / t_all:6.2f} img/s  ({n} images, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
  main()
