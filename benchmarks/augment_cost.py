"""What config.augment costs: the covid19_ct_cpu train step (64 px, batch 16) with and without it, interleaved.

  python benchmarks/augment_cost.py

Augmentation runs on device inside the step (dsn_saal_jax/augment.py), so the host pipeline pays nothing;
this times what the step pays. Medians of 10 interleaved calls each.
"""

import os
import time

import jax
import numpy as np

import dsn_saal_jax
from dsn_saal_jax import config_lib, losses, models, optim, runtime, steps as steps_lib
from dsn_saal_jax.data_info import DataInfo

dsn_saal_jax.setup_host()  # the XLA:CPU flag and kernels the trainer runs with, before JAX starts

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "covid19_ct_cpu.py")
COUNTS = np.array([234, 191])  # COVID19-CT's training split


def main() -> None:
  c = config_lib.from_file(CONFIG)
  info = DataInfo(("non_covid", "covid"), COUNTS, 425, {}, (64, 64, 3), 26, {})
  model = models.create_model(c, 2)
  opt, sched = optim.make_optimizer(c, 26), optim.make_lr_schedule(c, 26)
  loss_fn = losses.make_loss_fn(c, COUNTS)
  state = runtime.replicate(steps_lib.create_train_state(c, model, (64, 64, 3), opt, jax.random.PRNGKey(0),
                                                         class_counts=COUNTS))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(1, 16, 64, 64, 3)).astype(np.float32),
           "label": rng.integers(0, 2, (1, 16)).astype(np.int32)}
  key, steps = jax.random.PRNGKey(1), {}
  for aug in (False, True):
    c.augment = aug
    steps[aug] = jax.pmap(steps_lib.make_train_step(c, info.meta_counts, model, loss_fn, opt, sched),
                          axis_name=steps_lib.AXIS, in_axes=(0, 0, None))
    jax.block_until_ready(steps[aug](state, batch, key))  # compile
  times = {False: [], True: []}
  for _ in range(10):
    for aug in (False, True):
      t = time.perf_counter()
      jax.block_until_ready(steps[aug](state, batch, key))
      times[aug].append(time.perf_counter() - t)
  a, b = np.median(times[False]), np.median(times[True])
  print(f"step without augment {a * 1e3:.1f} ms, with {b * 1e3:.1f} ms, ratio {b / a:.3f}")


if __name__ == "__main__":
  main()
