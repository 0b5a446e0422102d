"""setup.cfg's extras are what the README and the accelerator launchers install (moved from test_console)."""

import configparser
import os
import re

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extras() -> dict[str, list[Requirement]]:
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  return {name: [Requirement(r) for r in value.strip().splitlines()]
          for name, value in cfg["options.extras_require"].items()}


def test_accelerator_and_tensorboard_extras_install_what_their_names_say():
  found = extras()
  (cuda,), (tpu,), (viewer,) = found["cuda12"], found["tpu"], found["tensorboard"]
  assert (cuda.name, cuda.extras) == ("jax", {"cuda12"})
  assert (tpu.name, tpu.extras) == ("jax", {"tpu"})
  assert viewer.name == "tensorboard" and not viewer.extras


def test_every_extra_the_launchers_and_readme_install_exists():
  read = lambda *path: open(os.path.join(ROOT, *path)).read()
  assert re.search(r"""^python -m pip install -q -e "\.\[cuda12\]" """, read("launch", "slurm_gpu.sbatch"), re.M)
  assert re.search(r"""pip install -q -e '\.\[tpu\]'""", read("launch", "tpu_pod.sh"))
  named = {e for text in (read("README.md"), read("launch", "slurm_gpu.sbatch"), read("launch", "tpu_pod.sh"))
           for group in re.findall(r"""\.\[([\w,-]+)\]""", text) for e in group.split(",")}
  assert named and named <= set(extras()), named - set(extras())
