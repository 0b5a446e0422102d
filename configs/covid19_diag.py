"""COVID19-Diag (the paper's clinical set, Tables 3-6): 3 classes, 1x224x224, lung mask.

Variants: `--config=configs/covid19_diag.py:baseline,ce` or
`:dsn,saal,covid_fraction=0.25,seed=1`; any field also via `--config.KEY=VALUE`.
"""

from dsn_saal_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("covid19_diag", channels=1, lung_mask=True, arg=arg)
