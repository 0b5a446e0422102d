"""COVIDx-CT (Table 7): normal / pneumonia / COVID-19 slices resized to 3x224x224."""

from dsn_saal_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("covidx_ct", channels=3, lung_mask=False, arg=arg)
