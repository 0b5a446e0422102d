"""Your own labeled CT slices (one folder per class; see dsn_saal_jax/data/folders.py), 3x224x224.

  python launch/train.py --config=configs/image_folder.py --config.manual_dir=/path/to/folder \
      --workdir=/tmp/my_ct
Without train/val/test folders each class's cases are split 70/10/20
(--config.split_fractions, seeded by --config.split_seed). Classes are the
sorted folder names unless --config.class_names gives the order; the class
that covid_fraction thins is the one named covid unless --config.minority_class
says otherwise. COVIDx-CT's low-data protocol: `:train_per_class=1000`.
"""

from dsn_saal_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("image_folder", channels=3, lung_mask=False, arg=arg)
