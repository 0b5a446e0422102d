"""The paper's optimizer: SGD, momentum 0.9, PyTorch-coupled weight decay, step-decayed learning rate."""

from __future__ import annotations

import jax
import ml_collections
import optax

from dsn_saal_jax import losses


def make_lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """lr divided by 1/lr_decay_factor every lr_decay_epochs epochs (staircase, in steps)."""
  if config.learning_rate <= 0:
    raise ValueError(f"learning_rate must be positive, got {config.learning_rate}.")
  return optax.exponential_decay(
      config.learning_rate, transition_steps=config.lr_decay_epochs * steps_per_epoch,
      decay_rate=config.lr_decay_factor, staircase=True)


# Which parts of the params pytree (`losses.param_labels`) the optimizer's weight decay applies to. Both, on
# purpose: with update_rule='joint' the paper trains SAAL's alpha and beta as one torch param group with the
# network (SGD, weight_decay 5e-4); with update_rule='meta' this optimizer sees the network's part only, and
# the loss's parameters take Adam without decay (`steps.make_meta_optimizer`). See docs/design.md.
DECAYED = {"network": True, "loss": True}


def decay_mask(params) -> dict:
  """True for every leaf of `params` that `DECAYED` says is decayed."""
  return jax.tree_util.tree_map(DECAYED.get, losses.param_labels(params))


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """torch.optim.SGD(lr, momentum, weight_decay): the decay is added to the gradient before momentum.

  The decay goes through an optax mask (`decay_mask`): today every leaf,
  the SAAL alpha and beta included, exactly as one torch param group over
  all parameters would.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
      optax.sgd(make_lr_schedule(config, steps_per_epoch), momentum=config.momentum))
