"""Learning the loss's own parameters: alpha's parametrization, the meta set and the bilevel (meta) step."""

import numpy as np
import pytest

from dsn_saal_jax import checkpointing, config_lib, train


def test_alpha_param_is_in_the_fingerprint_and_older_checkpoints_are_sigmoid():
  """A checkpoint's raw alpha means another alpha under the other parametrization, so resuming across is refused."""
  sigmoid, log10 = config_lib.base_config(), config_lib.base_config()
  log10.saal.alpha_param = "log10"
  old, new = train.model_fingerprint(sigmoid, 3), train.model_fingerprint(log10, 3)
  assert checkpointing.fingerprint_differences(old, new) == [
      "saal_alpha_param: checkpoint 'sigmoid' vs config 'log10'"]
  legacy = {k: v for k, v in old.items() if k != "saal_alpha_param"}  # written before alpha_param existed
  assert checkpointing.fingerprint_differences(legacy, old) == []
  log10.saal.alpha_param = "log"
  with pytest.raises(ValueError, match=r"config.saal.alpha_param='log' is not one of sigmoid, log10"):
    config_lib.validate_config(log10, 1)
