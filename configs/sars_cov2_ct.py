"""SARS-CoV-2 CT-scan (Table 9): no official split, 5 deterministic folds (`fold=0..4`), 3x224x224."""

from dsn_saal_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("sars_cov2_ct", channels=3, lung_mask=False, arg=arg)
