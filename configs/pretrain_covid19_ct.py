"""SimCLR pretraining on UCSD COVID19-CT's training slices at the CPU budget of configs/covid19_ct_cpu.py.

Same input and backbone as that config (64x64 RGB-replicated slices, VGG16-BN widths /8), so that
`--config.init_checkpoint=<workdir>/backbone` fits it; the validation and test splits are never read.
Variants as for the other configs, e.g. `--config=configs/pretrain_covid19_ct.py:seed=1`.
"""

import os

from dsn_saal_jax import config_lib, pretrain


def get_config(arg=None):
  base = config_lib.from_file(os.path.join(os.path.dirname(__file__), "covid19_ct_cpu.py"))
  config = pretrain.pretrain_config(base)
  config.batch_size = 64
  config.num_epochs = 100
  config.log_every_steps = 6
  return config_lib.apply_variant(config, arg)
