"""UCSD COVID19-CT at a 2-core CPU budget: the protocol of results/covid19_ct_cpu.

The paper's protocol (configs/covid19_ct.py: 224x224, full VGG16-BN from
ImageNet weights, 120 epochs) scaled to about 3 minutes a run from random
init: 64x64 slices, a narrow VGG16-BN (same 13 convs and 5 side heads, widths
/8, 128-unit classifier), batch 16, 30 epochs at lr 0.01, /10 after epoch 20;
best epoch by validation macro F1, reported on test. SAAL class weights are
normalized (the default; results/covid19_ct_cpu/README.md says why);
`--config.loss_kwargs.saal.normalize_weights=false` gives the paper's literal Eq. 10.
Variants as for the paper configs, e.g. `--config=configs/covid19_ct_cpu.py:baseline,ce,seed=1`.
"""

from dsn_saal_jax import config_lib


def get_config(arg=None):
  config = config_lib.paper_config("covid19_ct", channels=3, lung_mask=False, arg=None)
  config.image_size = 64
  config.model.widths = (8, 16, 32, 64, 64)
  config.model.hidden = 128
  config.batch_size = 16
  config.learning_rate = 0.01
  config.num_epochs = 30
  config.lr_decay_epochs = 20
  config.log_every_steps = 13
  config.keep_checkpoints = 1
  config.gradcam_per_class = 2
  return config_lib.apply_variant(config, arg)
