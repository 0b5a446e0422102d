"""UCSD COVID19-CT (Table 8): official split, slices resized to 3x224x224."""

from dsn_saal_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("covid19_ct", channels=3, lung_mask=False, arg=arg)
