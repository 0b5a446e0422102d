"""One-call device check: the DSN train step's speed, MFU and memory on this machine's accelerator, then the trainer.

  PYTHONPATH=. python benchmarks/accelerator.py --out=/tmp/accelerator   # one GPU or TPU: ~5 min, < 8
  PYTHONPATH=. python benchmarks/accelerator.py --tiny                   # anywhere in seconds (automatic on CPU)

Part 1, for each backbone (VGG16-BN, ResNet-50, with side heads) and compute dtype
(bfloat16, float32) at 224 px: the trainer's own pmapped train step on one
device, fed one in-memory batch: first call (compile) time, step time (a
median over timed runs of back-to-back steps), images/s, MFU (XLA's FLOP count
of the step / step time / the chip's dense peak for that dtype, looked up by
device kind; float32 against the TF32 peak, as XLA runs f32 convs and dots in
TF32 on these GPUs; left out, and said so, for a kind not in `PEAKS`) and peak
device memory (`device.memory_stats()`, where the backend gives it). On an
accelerator each configuration runs in its own process, so each peak is its
own and one out-of-memory failure is recorded, not fatal.

Part 2, the trainer end to end (`train.train_and_evaluate`, the first backbone,
bfloat16 on an accelerator) on synthetic 512-px CT slices (`data/phantom.py`,
windowed WL -400 / WW 1500, not lung-masked), prepared once as the input
pipeline prepares a build (resized bilinear, antialiased, rounded to uint8,
into a prepared directory with its catalog; the resize is `jax.image.resize`
here, TensorFlow's there, so pixels may differ by a gray level) and then read
by the trainer's own reading half, `prepared_dataset.Dataset` (gather, lookup-
table normalization, worker threads), exactly as a TFDS-built run reads it.
Building a TFDS dataset is the only part left out (it needs TensorFlow, which
the device image lacks). Its images/s (the trainer's logged windows after the
first) against the bare step's say whether the run is input- or loop-bound;
the iterator's own rate (batches to device, no step) is printed too.

It imports nothing from TensorFlow, so it runs on an image with JAX, flax,
optax, orbax-checkpoint, chex, absl-py, numpy, scipy, scikit-image and
scikit-learn alone, plus ml_collections (the trainer's configs), a small
pure-Python wheel to carry there, e.g. for the device tool's `run`:
  pip download --no-deps -d wheels ml_collections==1.1.0   # here, once (wheels/ is untracked: it travels)
  run: pip install --no-index --no-deps wheels/*.whl && PYTHONPATH=. python benchmarks/accelerator.py --out=$OUT
Writes accelerator.json and accelerator.txt (the table) to --out, and the table to stdout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

try:
  import ml_collections  # pylint: disable=unused-import
except ImportError:
  sys.exit("Error: ml_collections is not installed (the trainer's configs need it). It is a small pure-Python "
           "wheel: `pip download --no-deps -d wheels ml_collections==1.1.0` where a registry is reachable, then "
           "`pip install --no-index --no-deps wheels/*.whl` here.")

# pylint: disable=g-import-not-at-top,wrong-import-position
import dsn_saal_jax
from dsn_saal_jax import config_lib, losses, metrics as metrics_lib, models, optim, prepared, prepared_dataset, runtime
from dsn_saal_jax import train
from dsn_saal_jax import steps as steps_lib

dsn_saal_jax.setup_host(tensorflow=False)  # the trainer's XLA:CPU flag and kernels, before JAX starts

FLAGS = flags.FLAGS
flags.DEFINE_list("backbones", ["vgg16_bn", "resnet50"], "Backbones (each with its side heads).")
flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "config.compute_dtype values.")
flags.DEFINE_integer("image_size", 224, "Image side of the step benchmarks and the end-to-end run.")
flags.DEFINE_integer("batch", 64, "Per-device batch.")
flags.DEFINE_integer("steps", 20, "Timed steps per run (after one untimed warm-up step).")
flags.DEFINE_integer("runs", 3, "Timed runs of --steps back-to-back steps (the median is reported).")
flags.DEFINE_integer("e2e_steps", 60, "End-to-end training steps (0: skip the end-to-end part).")
flags.DEFINE_integer("e2e_slices", 64, "Distinct synthetic 512-px slices (repeated to fill the epoch).")
flags.DEFINE_integer("source_size", 512, "Side of the synthetic source slices.")
flags.DEFINE_bool("tiny", None, "A tiny size for a CPU check (default: on when JAX has only CPUs).")
flags.DEFINE_bool("isolate", None, "Each step configuration in its own process (default: unless tiny).")
flags.DEFINE_string("out", os.environ.get("OUT", ""), "Folder for accelerator.json and accelerator.txt.")
flags.DEFINE_string("child", "", "Internal: run one step configuration BACKBONE:DTYPE and print its result.")

NUM_CLASSES, CLASS_COUNTS = 3, np.array([50, 30, 20])
# Dense peak TFLOP/s by device kind (first matching substring): bfloat16 and float32 (GPUs: TF32, what XLA
# uses for f32 convs and dots there; TPUs run f32 matmuls as bf16 passes, so their f32 MFU is left out).
PEAKS = (("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
         ("H100", {"bfloat16": 989.0, "float32": 494.0}),
         ("H200", {"bfloat16": 989.0, "float32": 494.0}),
         ("A100", {"bfloat16": 312.0, "float32": 156.0}),
         ("TPU v4", {"bfloat16": 275.0}),
         ("TPU v5 lite", {"bfloat16": 197.0}), ("TPU v5e", {"bfloat16": 197.0}),
         ("TPU v5p", {"bfloat16": 459.0}), ("TPU v5", {"bfloat16": 459.0}))


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  for name, peaks in PEAKS:
    if name.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def make_config(backbone: str, dtype: str, batch: int, image_size: int):
  c = config_lib.base_config()
  c.backbone, c.compute_dtype, c.image_size = backbone, dtype, image_size
  c.batch_size = c.eval_batch_size = batch * jax.local_device_count()
  if FLAGS.tiny:  # the same programs, narrow: seconds to compile on a CPU
    if backbone.startswith("vgg"):
      c.model.stages, c.model.widths, c.model.hidden = (1, 1, 1, 1, 1), (8, 16, 16, 32, 32), 64
    else:
      c.model.width_scale = 0.125
  return c


def peak_memory(device) -> int | None:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def step_result(backbone: str, dtype: str) -> dict:
  """The trainer's train step alone on one device: compile and step time, images/s, MFU, peak memory."""
  device = jax.local_devices()[0]
  c = make_config(backbone, dtype, FLAGS.batch, FLAGS.image_size)
  c.batch_size = FLAGS.batch
  model, optimizer = models.create_model(c, NUM_CLASSES), optim.make_optimizer(c, 100)
  loss_fn, schedule = losses.make_loss_fn(c, CLASS_COUNTS), optim.make_lr_schedule(c, 100)
  shape = (FLAGS.image_size, FLAGS.image_size, c.channels)
  state = steps_lib.create_train_state(c, model, shape, optimizer, jax.random.PRNGKey(0),
                                       class_counts=CLASS_COUNTS)
  step = steps_lib.make_train_step(c, None, model, loss_fn, optimizer, schedule)
  rng = jax.random.PRNGKey(1)
  data = np.random.default_rng(0)
  batch = {"image": data.standard_normal((FLAGS.batch, *shape)).astype(np.float32),
           "label": data.integers(0, NUM_CLASSES, FLAGS.batch).astype(np.int32)}
  # XLA's FLOP count of the step body (unmapped: vmap over a 1-element axis of the same name), as train_step.py.
  add = lambda x: jnp.asarray(x)[None]
  cost = jax.jit(jax.vmap(step, axis_name=steps_lib.AXIS, in_axes=(0, 0, None))).lower(
      jax.tree_util.tree_map(add, state), jax.tree_util.tree_map(add, batch), rng).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  p_step = jax.pmap(step, axis_name=steps_lib.AXIS, in_axes=(0, 0, None), donate_argnums=(0,), devices=[device])
  rstate = runtime.replicate(state, [device])
  batch = runtime.replicate(batch, [device])
  start = time.perf_counter()
  rstate, metrics = p_step(rstate, batch, rng)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  rstate, metrics = p_step(rstate, batch, rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(FLAGS.runs):
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      rstate, metrics = p_step(rstate, batch, rng)
    jax.block_until_ready((rstate, metrics))
    times.append((time.perf_counter() - start) / FLAGS.steps)
  step_s = statistics.median(times)
  peak = peak_tflops(device.device_kind, dtype)
  return {"backbone": backbone, "dtype": dtype, "image_size": FLAGS.image_size, "batch": FLAGS.batch,
          "compile_s": first - step_s, "step_s": step_s, "images_per_sec": FLAGS.batch / step_s,
          "gflop_per_step": flops / 1e9, "tflops_per_sec": flops / step_s / 1e12, "peak_tflops": peak,
          "mfu": flops / step_s / (peak * 1e12) if peak and np.isfinite(flops) else None,
          "peak_memory_bytes": peak_memory(device),
          "loss_finite": bool(np.isfinite(runtime.unreplicate(metrics)["loss"]))}


def isolated_step_result(backbone: str, dtype: str) -> dict:
  """`step_result` in a fresh process: its own peak memory; an out-of-memory failure is a result, not an exit."""
  args = [a for a in sys.argv[1:] if not a.startswith(("--child", "--out"))]
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args, f"--child={backbone}:{dtype}"],
                        capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  return {"backbone": backbone, "dtype": dtype, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}


def _phantom_module():
  """data/phantom.py on its own: importing the data package would load TensorFlow."""
  path = os.path.join(os.path.dirname(train.__file__), "data", "phantom.py")
  spec = importlib.util.spec_from_file_location("dsn_saal_jax_phantom", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def synthetic_pixels(n: int, source_size: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """`n` synthetic CT slices at `source_size`, windowed, resized to uint8 (n, S, S, 1) as a prepared variant stores."""
  phantom, rng = _phantom_module(), np.random.default_rng(0)
  labels = rng.integers(0, len(phantom.CLASS_NAMES), n).astype(np.int64)
  lo, hi = -400 - 750, -400 + 750  # data/ct.py's window: WL -400, WW 1500
  slices = np.stack([np.round(np.clip((phantom.chest_slice(rng, source_size, int(y))[0] - lo) / (hi - lo), 0, 1)
                              * 255).astype(np.uint8) for y in labels])
  resize = jax.jit(lambda x: jax.image.resize(x.astype(jnp.float32), (len(x), image_size, image_size, 1),
                                              "linear", antialias=True))
  return np.clip(np.rint(np.asarray(resize(slices[..., None]))), 0, 255).astype(np.uint8), labels


def prepare_synthetic(root: str, config, num_train: int) -> None:
  """A prepared directory as input_pipeline.prepare_variants writes one: 'train' (the distinct slices repeated
  to `num_train`) and 'test' variants at config.image_size, then the catalog."""
  pixels, labels = synthetic_pixels(FLAGS.e2e_slices, FLAGS.source_size, config.image_size)
  keys = {}
  for split, count in (("train", num_train), ("test", config.eval_batch_size)):
    keys[split] = key = {"format": prepared.FORMAT, "dataset": config.dataset, "builder_config": "accelerator_check",
                         "version": "0", "split": split, "num_examples": count, "image_size": config.image_size,
                         "resize": prepared_dataset.RESIZE, "rounding": prepared.ROUNDING}
    writer, rows = prepared.Writer(root, key, count), np.arange(count) % len(labels)
    for start in range(0, count, 1024):
      writer.images[start:start + 1024] = pixels[rows[start:start + 1024]]
    writer.commit(labels[rows], [f"phantom_{i}" for i in rows])
  prepared_dataset.write_catalog(root, config.image_size, dataset=config.dataset,
                                 class_names=_phantom_module().CLASS_NAMES, covid_class=None, keys=keys,
                                 specs={0: ("train", {"test": "test"})})


def _metrics_only_report(config, state, dataset, split, out_dir, p_eval_step, rstate, extra=None):
  """The final report without its plots (matplotlib is not on the device image); not timed."""
  del config, state, out_dir, extra
  pred = train.predict_split(p_eval_step, rstate, dataset, split)
  return metrics_lib.compute_metrics(pred["labels"], pred["probs"], dataset.info.class_names)


def end_to_end(backbone: str, dtype: str, bare_images_per_sec: float | None) -> dict:
  """`train_and_evaluate` on pre-resized synthetic 512-px slices; its images/s against the bare step's."""
  c = make_config(backbone, dtype, FLAGS.batch, FLAGS.image_size)
  c.num_train_steps, c.log_every_steps = FLAGS.e2e_steps, max(1, FLAGS.e2e_steps // 6)
  c.checkpoint_every_steps, c.tensorboard, c.gradcam_per_class = FLAGS.e2e_steps, False, 1
  with tempfile.TemporaryDirectory() as root:
    start = time.perf_counter()
    # One epoch: an epoch end (its console line, the validation pass) waits for the device by design.
    prepare_synthetic(root, c, c.num_train_steps * c.batch_size)
    prepare_s = time.perf_counter() - start
    dataset = prepared_dataset.open_prepared(c, root)
    it, n = dataset.train_iter(0), 10
    next(it)
    start = time.perf_counter()
    for _ in range(n):
      jax.device_put(next(it)["image"]).block_until_ready()
    iterator_rate = n * c.batch_size / (time.perf_counter() - start)
    it.close()
    total_s, steps, rates = _train(c, dataset)
  windows = [float(r) for s, r in zip(steps, rates) if s > c.log_every_steps]
  e2e = statistics.median(windows) if windows else float("nan")
  ratio = e2e / bare_images_per_sec if bare_images_per_sec else None
  return {"backbone": backbone, "dtype": dtype, "image_size": FLAGS.image_size, "source_size": FLAGS.source_size,
          "global_batch": c.batch_size, "steps": c.num_train_steps, "prepare_s": prepare_s, "total_s": total_s,
          "images_per_sec": e2e, "bare_step_images_per_sec": bare_images_per_sec,
          "iterator_images_per_sec": iterator_rate, "e2e_over_bare": ratio,
          "input_bound": bool(iterator_rate < (bare_images_per_sec or 0.0)),
          "verdict": _verdict(ratio, iterator_rate, bare_images_per_sec)}


def _train(c, dataset) -> tuple[float, np.ndarray, np.ndarray]:
  """train_and_evaluate's wall time and logged (steps, images/s) windows."""
  report, train.write_report = train.write_report, _metrics_only_report
  try:
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      train.train_and_evaluate(c, workdir, dataset=dataset)
      total_s = time.perf_counter() - start
      steps, rates = runtime.read_history(workdir)["train/examples_per_sec"]
  finally:
    train.write_report = report
  return total_s, steps, rates


def _verdict(ratio: float | None, iterator_rate: float, bare: float | None) -> str:
  if not bare or ratio is None:
    return "no bare step to compare with"
  if iterator_rate < bare:
    return (f"input-bound: the input pipeline gives {iterator_rate:.0f} images/s, the step takes {bare:.0f}")
  if ratio < 0.9:
    return f"loop-bound: {ratio:.0%} of the bare step's images/s with input to spare ({iterator_rate:.0f} images/s)"
  return f"device-bound: {ratio:.0%} of the bare step's images/s"


def table(result: dict) -> str:
  lines = [f"device: {result['device_kind']} ({result['platform']}, {result['device_count']} device(s)), "
           f"jax {result['jax']}{', tiny sizes' if result['tiny'] else ''}", "",
           "| backbone | dtype | size/batch | compile s | step ms | images/s | TFLOP/s | MFU | peak memory GiB |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in result["steps"]:
    if "error" in r:
      lines.append(f"| {r['backbone']} | {r['dtype']} | failed: {r['error'][-200:]} |")
      continue
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    mem = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r["peak_memory_bytes"] is not None else "n/a"
    lines.append(f"| {r['backbone']} | {r['dtype']} | {r['image_size']}/{r['batch']} | {r['compile_s']:.1f} | "
                 f"{r['step_s'] * 1e3:.1f} | {r['images_per_sec']:.0f} | {r['tflops_per_sec']:.1f} | {mfu} | {mem} |")
  if result["mfu_note"]:
    lines.append(result["mfu_note"])
  e = result.get("end_to_end")
  if e:
    lines += ["", f"end to end ({e['backbone']}, {e['dtype']}, {e['source_size']}-px synthetic slices resized to "
              f"{e['image_size']}, global batch {e['global_batch']}, {e['steps']} steps): {e['images_per_sec']:.0f} "
              f"images/s against the bare step's {e['bare_step_images_per_sec'] or float('nan'):.0f}; "
              f"{e['verdict']}. (Input: the trainer's prepared-data reader; only the TFDS build is left out.)"]
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.tiny is None:
    FLAGS.tiny = jax.default_backend() == "cpu"
  if FLAGS.tiny:  # tiny defaults; flags given on the command line stay
    for name, value in (("image_size", 32), ("batch", 4), ("steps", 2), ("runs", 1), ("e2e_steps", 4),
                        ("e2e_slices", 8), ("source_size", 64)):
      if not FLAGS[name].present:
        setattr(FLAGS, name, value)
  # Compiled programs cached on disk: the end-to-end run (and any rerun) reuses the step benchmarks' compiles.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "dsn_saal_jax_xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  if FLAGS.child:
    print("RESULT " + json.dumps(step_result(*FLAGS.child.split(":"))), flush=True)
    return
  isolate = (not FLAGS.tiny) if FLAGS.isolate is None else FLAGS.isolate
  device = jax.local_devices()[0]
  result = {"platform": jax.default_backend(), "device_kind": device.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "tiny": FLAGS.tiny, "steps": []}
  for backbone in FLAGS.backbones:
    for dtype in FLAGS.dtypes:
      r = (isolated_step_result if isolate else step_result)(backbone, dtype)
      result["steps"].append(r)
      print(json.dumps(r), flush=True)
  missing = [r["dtype"] for r in result["steps"] if r.get("mfu") is None and "error" not in r]
  result["mfu_note"] = (f"MFU left out for {sorted(set(missing))}: no peak known for device kind "
                        f"{device.device_kind!r} in that dtype (benchmarks/accelerator.py PEAKS)." if missing else "")
  if FLAGS.e2e_steps > 0:
    dtype = "float32" if FLAGS.tiny or "bfloat16" not in FLAGS.dtypes else "bfloat16"
    bare = next((r["images_per_sec"] for r in result["steps"]
                 if r["backbone"] == FLAGS.backbones[0] and r["dtype"] == dtype and "error" not in r), None)
    bare = bare * jax.local_device_count() if bare else None  # the trainer runs every local device
    result["end_to_end"] = end_to_end(FLAGS.backbones[0], dtype, bare)
  text = table(result)
  print(text)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "accelerator.json"), "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(FLAGS.out, "accelerator.txt"), "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
