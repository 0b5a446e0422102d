"""The paper's optimizer: SGD, momentum 0.9, PyTorch-coupled weight decay, step-decayed learning rate."""

from __future__ import annotations

import ml_collections
import optax


def make_lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """lr divided by 1/lr_decay_factor every lr_decay_epochs epochs (staircase, in steps)."""
  if config.learning_rate <= 0:
    raise ValueError(f"learning_rate must be positive, got {config.learning_rate}.")
  return optax.exponential_decay(
      config.learning_rate, transition_steps=config.lr_decay_epochs * steps_per_epoch,
      decay_rate=config.lr_decay_factor, staircase=True)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """torch.optim.SGD(lr, momentum, weight_decay): the decay is added to the gradient before momentum.

  It applies to every leaf of the params pytree, including the SAAL alpha and
  beta, exactly as one torch param group over all parameters would.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(make_lr_schedule(config, steps_per_epoch), momentum=config.momentum))
