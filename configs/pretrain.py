"""SimCLR pretraining (Self-Trans, Table 3) on the generated `synthetic_ct` training split, CPU-sized.

The backbone of configs/default.py (narrow VGG16-BN, 64x64 gray slices); labels are never read.
Variants pick the backbone or set fields, e.g. `--config=configs/pretrain.py:resnet50,model.width_scale=0.25`;
`--config.pretrain.folder=DIR` pretrains on a folder of unlabeled slices instead.
"""

import os

from dsn_saal_jax import config_lib, pretrain


def get_config(arg=None):
  config = pretrain.pretrain_config(config_lib.from_file(os.path.join(os.path.dirname(__file__), "default.py")))
  config.batch_size = 64
  config.num_epochs = 30
  config.log_every_steps = 10
  config.keep_checkpoints = 1
  return config_lib.apply_variant(config, arg)
