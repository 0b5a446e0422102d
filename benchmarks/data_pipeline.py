"""Input-pipeline throughput (decode + resize + normalize + batch), in images per second.

  python benchmarks/data_pipeline.py                      # covid19_ct if present, else synthetic_ct
  python benchmarks/data_pipeline.py --dataset=synthetic_ct --synthetic_image_size=256

Compare the result with the training step's images/s: the pipeline runs on
CPU threads while the accelerator trains, so it only matters if it is slower.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import ml_collections
import tensorflow_datasets as tfds

from dsn_saal_jax.data import builders, input_pipeline


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = "covid19_ct" if builders.default_manual_dir("covid19_ct") else "synthetic_ct"
  parser.add_argument("--dataset", default=default, choices=sorted(builders.BUILDERS))
  parser.add_argument("--data_dir", default="", help="TFDS data dir ('' = TFDS default).")
  parser.add_argument("--manual_dir", default="")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=50, help="Timed training batches.")
  parser.add_argument("--warmup", type=int, default=5, help="Untimed batches first.")
  parser.add_argument("--synthetic_scale", type=float, default=0.1)
  parser.add_argument("--synthetic_image_size", type=int, default=256)
  return parser.parse_args()


def images_per_second(iterator, batches: int, warmup: int) -> tuple[float, int]:
  """Throughput over `batches` batches after `warmup` untimed ones."""
  for _ in itertools.islice(iterator, warmup):
    pass
  start, images = time.perf_counter(), 0
  for batch in itertools.islice(iterator, batches):
    images += batch["label"].size
  return images / (time.perf_counter() - start), images


def main() -> None:
  args = parse_args()
  tfds.disable_progress_bar()
  config = ml_collections.ConfigDict(dict(
      dataset=args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir,
      image_size=args.image_size, channels=args.channels, covid_fraction=1.0, fold=0, seed=0,
      batch_size=args.batch_size, eval_batch_size=args.batch_size, lung_mask=False,
      synthetic_scale=args.synthetic_scale, synthetic_image_size=args.synthetic_image_size))
  start = time.perf_counter()
  ds = input_pipeline.create_dataset(config)
  print(f"dataset {args.dataset}: {ds.info.num_train} training images, ready in "
        f"{time.perf_counter() - start:.1f} s (including a build if it was absent)")
  train_rate, n = images_per_second(ds.train_iter(), args.steps, args.warmup)
  eval_split = next(iter(ds.info.num_eval))
  eval_rate, m = images_per_second(ds.eval_iter(eval_split), 10**9, 0)
  print(f"{os.cpu_count()} CPUs, {args.image_size}x{args.image_size}x{args.channels}, "
        f"batch {args.batch_size}:")
  print(f"  train pipeline: {train_rate:8.1f} images/s ({n} images)")
  print(f"  eval pipeline ({eval_split}, one pass incl. start-up): {eval_rate:8.1f} images/s "
        f"({m} slots)")


if __name__ == "__main__":
  main()
