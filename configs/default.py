"""Default: DSN-SAAL on the generated `synthetic_ct` set, small enough for a 2-core CPU.

The paper's protocol scaled down: a narrow VGG16-BN (same 13 convs, 5 side
heads, widths /8 to /16, 128-unit classifier) on 64x64 slices, 15 epochs, the
learning rate divided by 10 after 10. From random init the SAAL class weights
are normalized (w <- C w / sum w): unnormalized, the learnable alpha runs to 1
within an epoch, all w_n shrink to ~1/k_n and the network stops learning.
Variants as for the paper configs, e.g. `--config=configs/default.py:baseline,ce`.
"""

from dsn_saal_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.dataset = "synthetic_ct"
  config.synthetic_scale = 0.1
  config.synthetic_image_size = 64
  config.image_size = 64
  config.channels = 1
  config.lung_mask = True
  config.model.widths = (8, 16, 32, 32, 32)
  config.model.hidden = 128
  config.learning_rate = 0.02
  config.num_epochs = 15
  config.lr_decay_epochs = 10
  config.log_every_steps = 15
  config.gradcam_per_class = 4
  return config_lib.apply_variant(config, arg)
