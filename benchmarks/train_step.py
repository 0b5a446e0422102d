"""JAX vs the PyTorch reference: DSN-SAAL train and eval step, timed interleaved in one process.

  python benchmarks/train_step.py                      # 224/batch 8 and 112/batch 32, float32
  python benchmarks/train_step.py --backbone=resnet50  # any registered backbone, with its side heads
  python benchmarks/train_step.py --sizes=64:8 --rounds=3 --widths=8x16x32x64x64 --hidden=128
  python benchmarks/train_step.py --meta               # the bilevel step's cost, as a ratio to the plain step
  python benchmarks/train_step.py --torch=channels_last  # against one PyTorch variant only

Both sides run the same network (DSN-<backbone>, six heads), the SAAL loss and an
SGD step with momentum and weight decay (alpha, beta included) on the same
batch. JAX uses the trainer's own pmapped `train_step`/`eval_step` (one
device); PyTorch runs eagerly in NCHW, then in channels_last (oneDNN's
preferred layout), then channels_last under `torch.compile` (`--torch`).
After warm-up, each round times one JAX step then one PyTorch step, so both
see the same machine load; the medians are reported with their ratio, one
line per PyTorch variant. GFLOP/s use XLA's FLOP count of the step for both
sides, against a measured float32 matmul peak.

`--meta` times JAX only: the trainer's `meta_train_step` (config.meta.update_rule=
'meta', log10 alpha, the batch itself as meta batch) against its plain
`train_step` on the same model and batch, for meta_every_steps 1 and 5. Each
round runs 5 consecutive steps of each, so meta_every_steps=5 is timed over
one meta step and four plain ones; medians per step and their ratios.
"""

from __future__ import annotations

import functools
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags

import dsn_saal_jax
from dsn_saal_jax import config_lib, cpu, losses, models, optim, runtime, steps as steps_lib
from dsn_saal_jax.torch_reference import TORCH_MODELS, saal_loss_torch

dsn_saal_jax.setup_host(tensorflow=False)  # the trainer's XLA:CPU flag and kernels, before JAX starts

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["224:8", "112:32"], "image_size:batch pairs.")
flags.DEFINE_integer("rounds", 5, "Timed rounds (one JAX and one PyTorch step each) per size.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per side before timing.")
flags.DEFINE_enum("backbone", "vgg16_bn", models.list_models(), "Backbone (with side heads) on both sides.")
flags.DEFINE_string("widths", "64x128x256x512x512", "VGG stage widths (the paper's by default).")
flags.DEFINE_integer("hidden", 4096, "VGG classifier width.")
flags.DEFINE_integer("channels", 3, "Input channels.")
flags.DEFINE_bool("meta", False, "Time the bilevel meta step against the plain step (JAX only).")
flags.DEFINE_bool("breakdown", False, "Split the train step into forward, backward and update on both sides.")
flags.DEFINE_list("torch", ["eager", "channels_last", "compile"],
                  "PyTorch variants to time against: eager (NCHW), channels_last, compile (channels_last + "
                  "torch.compile).")

CLASS_COUNTS = np.array([234, 191])  # COVID19-CT's official training split


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Best float32 (n x n) @ (n x n) rate of XLA on this machine."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = min(_timed(lambda: mm(a).block_until_ready()) for _ in range(repeats))
  return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class JaxSide:
  """The trainer's pmapped steps on one device, state donated and fed back as in training."""

  def __init__(self, config, batch: dict[str, np.ndarray]):
    self.model = models.create_model(config, len(CLASS_COUNTS))
    loss_fn = losses.make_loss_fn(config, CLASS_COUNTS)
    optimizer = optim.make_optimizer(config, 100)
    shape = batch["image"].shape[1:]
    state = steps_lib.create_train_state(config, self.model, shape, optimizer, jax.random.PRNGKey(0))
    self.rstate = runtime.replicate(state, jax.local_devices()[:1])
    step = functools.partial(steps_lib.train_step, model=self.model, loss_fn=loss_fn, optimizer=optimizer,
                             learning_rate_fn=optim.make_lr_schedule(config, 100))
    self.p_train = jax.pmap(step, axis_name=steps_lib.AXIS, in_axes=(0, 0, None), donate_argnums=(0,),
                            devices=jax.local_devices()[:1])
    self.p_eval = jax.pmap(
        functools.partial(steps_lib.eval_step, model=self.model, loss_fn=loss_fn, eval_head="final"),
        axis_name=steps_lib.AXIS, devices=jax.local_devices()[:1])
    put = lambda x: runtime.replicate(x, jax.local_devices()[:1])
    self.batch = {"image": put(batch["image"]), "label": put(batch["label"])}
    self.eval_batch = {**self.batch, "mask": put(np.ones(len(batch["label"]), np.float32))}
    self.rng = jax.random.PRNGKey(1)
    self.flops = self._flops(config, step, state, batch)

  def _flops(self, config, step, state, batch) -> float:
    """XLA's FLOP count of one train step (unmapped, same program body)."""
    fn = jax.jit(jax.vmap(step, axis_name=steps_lib.AXIS, in_axes=(0, 0, None)))
    add = lambda x: jnp.asarray(x)[None]
    lowered = fn.lower(jax.tree_util.tree_map(add, state), jax.tree_util.tree_map(add, batch), self.rng)
    analysis = lowered.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", float("nan")))

  def train_step(self) -> None:
    self.rstate, metrics = self.p_train(self.rstate, self.batch, self.rng)
    jax.block_until_ready(metrics)

  def eval_step(self) -> None:
    jax.block_until_ready(self.p_eval(self.rstate, self.eval_batch))


class MetaSide:
  """The trainer's pmapped meta_train_step (update_rule='meta') on one device, the batch doubling as meta batch."""

  def __init__(self, config, batch: dict[str, np.ndarray], meta_every_steps: int):
    config = self.config = config.copy_and_resolve_references()
    config.meta.update_rule, config.loss_kwargs.saal.alpha_param = "meta", "log10"
    config.meta.every_steps = meta_every_steps
    model = models.create_model(config, len(CLASS_COUNTS))
    optimizer = optim.make_optimizer(config, 100)
    state = steps_lib.create_train_state(config, model, batch["image"].shape[1:], optimizer, jax.random.PRNGKey(0),
                                         class_counts=CLASS_COUNTS)
    meta_counts = CLASS_COUNTS // 10
    devices = jax.local_devices()[:1]
    loss_fn, schedule = losses.make_loss_fn(config, CLASS_COUNTS), optim.make_lr_schedule(config, 100)
    step = lambda meta_step: steps_lib.make_train_step(config, meta_counts, model, loss_fn, optimizer, schedule,
                                                       meta_step)
    self.p_steps = {meta_step: jax.pmap(step(meta_step), axis_name=steps_lib.AXIS, in_axes=(0, 0, None),
                                        donate_argnums=(0,), devices=devices) for meta_step in (True, False)}
    self.rstate, self.step = runtime.replicate(state, devices), 0
    put = lambda x: runtime.replicate(x, devices)
    self.batch = {"image": put(batch["image"]), "label": put(batch["label"]), "meta_image": put(batch["image"]),
                  "meta_label": put(batch["label"])}
    self.rng = jax.random.PRNGKey(1)

  def train_step(self) -> None:
    p_step = self.p_steps[steps_lib.is_meta_step(self.config, self.step)]
    self.rstate, metrics = p_step(self.rstate, self.batch, self.rng)
    self.step += 1
    jax.block_until_ready(metrics)


def bench_meta(size: int, batch_size: int) -> None:
  """Per-step medians of the plain and the meta step (every 1 and every 5 steps), rounds of 5 steps each."""
  config, batch = _config_and_batch(size, batch_size)
  sides = {"plain": JaxSide(config, batch), "meta every step": MetaSide(config, batch, 1),
           "meta every 5 steps": MetaSide(config, batch, 5)}
  cycle = lambda side: _timed(lambda: [side.train_step() for _ in range(5)]) / 5
  compile_s = {name: sum(_timed(side.train_step) for _ in range(5)) for name, side in sides.items()}
  for _ in range(FLAGS.warmup):
    for side in sides.values():
      cycle(side)
  times = {name: [] for name in sides}
  for _ in range(FLAGS.rounds):
    for name, side in sides.items():
      times[name].append(cycle(side))
  med = {name: statistics.median(v) for name, v in times.items()}
  print(f"\n== meta step, {FLAGS.backbone} (DSN, SAAL), {size}x{size}, batch {batch_size} (meta batch the same), "
        f"float32, {FLAGS.rounds} rounds of 5 steps (medians per step) ==")
  for name, t in med.items():
    print(f"{name:18s}: {t:.3f} s/step ({batch_size / t:7.2f} img/s), {t / med['plain']:.2f} x the plain step; "
          f"first 5 steps {compile_s[name]:.1f} s (compile)")


def _config_and_batch(size: int, batch_size: int):
  config = config_lib.base_config()
  config.backbone = FLAGS.backbone
  config.image_size, config.batch_size, config.channels = size, batch_size, FLAGS.channels
  config.model.widths, config.model.hidden = tuple(int(w) for w in FLAGS.widths.split("x")), FLAGS.hidden
  config.learning_rate = 0.01
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((batch_size, size, size, FLAGS.channels)).astype(np.float32),
           "label": rng.integers(0, 2, batch_size).astype(np.int32)}
  return config, batch


class TorchSide:
  """The same network, loss and optimizer in PyTorch: eager NCHW, or PyTorch at its best on a CPU.

  `channels_last` puts the model and input in oneDNN's preferred layout;
  `compile` also runs the model through `torch.compile` (inductor; the
  optimizer step stays eager).
  """

  def __init__(self, config, batch: dict[str, np.ndarray], channels_last: bool = False,
               compile: bool = False):  # pylint: disable=redefined-builtin
    # The torch references are torchvision's widths: width_scale (1.0 here) has no counterpart there.
    shape = {k: v for k, v in models.config_kwargs(config).items() if k not in ("dropout_rate", "width_scale")}
    self.model = TORCH_MODELS[config.backbone](len(CLASS_COUNTS), in_channels=config.channels, **shape)
    self.alpha = torch.zeros((), requires_grad=True)
    self.beta = torch.zeros(models.create_model(config, len(CLASS_COUNTS)).num_heads, requires_grad=True)
    self.opt = torch.optim.SGD(list(self.model.parameters()) + [self.alpha, self.beta], lr=config.learning_rate,
                               momentum=config.momentum, weight_decay=config.weight_decay)
    self.x = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    if channels_last:
      self.model = self.model.to(memory_format=torch.channels_last)
      self.x = self.x.to(memory_format=torch.channels_last)
    self.y = torch.from_numpy(batch["label"].astype(np.int64))
    self.counts = torch.tensor(CLASS_COUNTS, dtype=torch.float32)
    self.net = torch.compile(self.model) if compile else self.model

  def backward(self) -> None:
    """Forward and backward in train mode, gradients left in .grad (no update)."""
    self.model.train()
    self.opt.zero_grad(set_to_none=True)
    saal_loss_torch(self.net(self.x), self.y, self.alpha, self.beta, self.counts).backward()

  def train_step(self) -> None:
    self.backward()
    self.opt.step()

  def eval_step(self) -> None:
    self.model.eval()
    with torch.no_grad():
      torch.softmax(self.net(self.x)[-1], -1)


TORCH_VARIANTS = {"eager": {}, "channels_last": {"channels_last": True},
                  "compile": {"channels_last": True, "compile": True}}


def bench(size: int, batch_size: int, peak: float) -> None:
  """JAX against each PyTorch variant in turn (`--torch`), interleaved with JAX's steps round by round.

  One PyTorch side at a time next to JAX keeps memory at two models; each
  variant's ratio comes from rounds that alternate with JAX's, as before.
  """
  config, batch = _config_and_batch(size, batch_size)
  jx = JaxSide(config, batch)
  compile_s = _timed(jx.train_step) + _timed(jx.eval_step)
  rss_after_jax = _rss_gib()
  print(f"\n== {FLAGS.backbone} (DSN), {size}x{size}, batch {batch_size}, float32, {FLAGS.rounds} interleaved "
        f"rounds (medians); JAX's first train+eval step {compile_s:.1f} s (compiles), peak RSS {rss_after_jax:.2f} GiB ==")
  for variant in FLAGS.torch:
    try:
      tx = TorchSide(config, batch, **TORCH_VARIANTS[variant])
      torch_first_s = _timed(tx.train_step) + _timed(tx.eval_step)
    except Exception as e:  # pylint: disable=broad-except  (torch.compile's failures vary by CPU and compiler)
      print(f"PyTorch {variant}: failed to run ({type(e).__name__}: {str(e)[:300]}); no ratio")
      continue
    for _ in range(FLAGS.warmup):
      jx.train_step(), tx.train_step(), jx.eval_step(), tx.eval_step()
    times = {k: [] for k in ("jax_train", "torch_train", "jax_eval", "torch_eval")}
    for _ in range(FLAGS.rounds):
      times["jax_train"].append(_timed(jx.train_step))
      times["torch_train"].append(_timed(tx.train_step))
      times["jax_eval"].append(_timed(jx.eval_step))
      times["torch_eval"].append(_timed(tx.eval_step))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"-- PyTorch {variant} (first train+eval step {torch_first_s:.1f} s"
          f"{', compiles' if variant == 'compile' else ''}):")
    for phase in ("train", "eval"):
      j, t = med[f"jax_{phase}"], med[f"torch_{phase}"]
      line = (f"{phase:5s}: JAX {batch_size / j:7.2f} img/s ({j:.2f} s)  PyTorch {variant} {batch_size / t:7.2f} img/s "
              f"({t:.2f} s)  JAX/PyTorch {t / j:.2f}")
      if phase == "train":
        line += (f"  | {jx.flops / 1e9:.1f} GFLOP/step: JAX {jx.flops / j / 1e9:.0f}, PyTorch "
                 f"{jx.flops / t / 1e9:.0f} GFLOP/s ({jx.flops / j / 1e9 / peak:.0%} / "
                 f"{jx.flops / t / 1e9 / peak:.0%} of the matmul peak)")
      print(line, flush=True)
    del tx
  print(f"peak RSS {_rss_gib():.2f} GiB")


class Phases:
  """Forward (train mode), forward + backward, and the whole step, on each side: where a train step's time goes.

  JAX: jitted model.apply, then jitted value_and_grad of the SAAL loss (no
  update), then the trainer's step. PyTorch: the same three, eager.
  """

  def __init__(self, config, batch: dict[str, np.ndarray]):
    self.jx, self.tx = JaxSide(config, batch), TorchSide(config, batch)
    # The trainer's model with BatchNorm statistics of this device alone (no pmap axis here).
    model = models.create_model(config, len(CLASS_COUNTS), axis_name=None)
    loss_fn = losses.make_loss_fn(config, CLASS_COUNTS)
    state = jax.tree_util.tree_map(lambda x: x[0], self.jx.rstate)
    image, label, rng = jnp.asarray(batch["image"]), jnp.asarray(batch["label"]), {"dropout": self.jx.rng}

    def forward(params):
      return model.apply({"params": losses.split_params(params)[0], "batch_stats": state.batch_stats}, image,
                         train=True, mutable=["batch_stats"], rngs=rng)

    def loss(params):
      heads, _ = forward(params)
      return loss_fn(heads, label, losses.split_params(params)[1])[0]

    jit_forward, jit_grad = jax.jit(forward), jax.jit(jax.grad(loss))
    self.jax_fns = {"forward": lambda: jax.block_until_ready(jit_forward(state.params)),
                    "forward+backward": lambda: jax.block_until_ready(jit_grad(state.params)),
                    "step": self.jx.train_step}
    self.torch_fns = {"forward": self._torch_forward, "forward+backward": self.tx.backward,
                      "step": self.tx.train_step}

  def _torch_forward(self) -> None:
    self.tx.model.train()
    saal_loss_torch(self.tx.model(self.tx.x), self.tx.y, self.tx.alpha, self.tx.beta, self.tx.counts)



def bench_breakdown(size: int, batch_size: int) -> None:
  config, batch = _config_and_batch(size, batch_size)
  phases = Phases(config, batch)
  names = list(phases.jax_fns)
  for _ in range(FLAGS.warmup):
    for name in names:
      phases.jax_fns[name](), phases.torch_fns[name]()
  times = {(side, name): [] for side in ("jax", "torch") for name in names}
  for _ in range(FLAGS.rounds):
    for name in names:
      times["jax", name].append(_timed(phases.jax_fns[name]))
      times["torch", name].append(_timed(phases.torch_fns[name]))
  med = {k: statistics.median(v) for k, v in times.items()}
  # Each phase's own time: the backward is (forward+backward) - forward, the update step - (forward+backward).
  own = {side: {"forward": med[side, "forward"],
                "backward": med[side, "forward+backward"] - med[side, "forward"],
                "update and the rest": med[side, "step"] - med[side, "forward+backward"]}
         for side in ("jax", "torch")}
  print(f"\n== {FLAGS.backbone} (DSN), {size}x{size}, batch {batch_size}: where a train step's time goes, "
        f"{FLAGS.rounds} interleaved rounds (medians) ==")
  for phase in own["jax"]:
    j, t = own["jax"][phase], own["torch"][phase]
    print(f"{phase:20s}: JAX {j:6.3f} s  PyTorch {t:6.3f} s  JAX/PyTorch {t / j if j > 0 else float('nan'):.2f}")
  print(f"{'whole step':20s}: JAX {med['jax', 'step']:6.3f} s  PyTorch {med['torch', 'step']:6.3f} s  "
        f"JAX/PyTorch {med['torch', 'step'] / med['jax', 'step']:.2f}")


def main(argv):
  del argv
  torch.manual_seed(0)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({cpu.describe()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  if FLAGS.meta or FLAGS.breakdown:
    for spec in FLAGS.sizes:
      (bench_meta if FLAGS.meta else bench_breakdown)(*(int(v) for v in spec.split(":")))
    return
  peak = matmul_peak_gflops()
  print(f"float32 matmul peak (XLA, 2048^3): {peak:.0f} GFLOP/s")
  for spec in FLAGS.sizes:
    size, batch_size = (int(v) for v in spec.split(":"))
    bench(size, batch_size, peak)


if __name__ == "__main__":
  app.run(main)
