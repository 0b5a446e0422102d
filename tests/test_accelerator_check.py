"""benchmarks/accelerator.py, the one-call device check, runs where TensorFlow cannot be imported (a lent GPU's
image has none) and writes every field its table and a later session read."""

import json
import os
import subprocess
import sys

from conftest import HERE

SCRIPT = os.path.join(os.path.dirname(HERE), "benchmarks", "accelerator.py")
NO_TENSORFLOW = ("import sys\nfor name in ('tensorflow', 'tensorflow_datasets', 'array_record'):\n"
                 "  sys.modules[name] = None\n")


def test_accelerator_check_runs_on_cpu_without_tensorflow(tmp_path):
  shim = tmp_path / "shim"
  shim.mkdir()
  (shim / "sitecustomize.py").write_text(NO_TENSORFLOW)  # `import tensorflow` raises ImportError
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), os.path.dirname(HERE),
                                                      os.environ.get("PYTHONPATH", "")]))
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, SCRIPT, "--backbones=vgg16_bn", "--dtypes=float32", f"--out={out}"],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads((out / "accelerator.json").read_text())
  assert result["platform"] == "cpu" and result["tiny"]  # tiny sizes chosen by itself on a CPU
  (step,) = result["steps"]
  assert (step["backbone"], step["dtype"], step["image_size"], step["batch"]) == ("vgg16_bn", "float32", 32, 4)
  assert step["compile_s"] > 0 and step["step_s"] > 0 and step["loss_finite"]
  assert abs(step["images_per_sec"] * step["step_s"] - step["batch"]) < 1e-6
  assert step["gflop_per_step"] > 0
  assert step["mfu"] is None and "no peak known for device kind 'cpu'" in result["mfu_note"]  # said, not guessed
  e2e = result["end_to_end"]
  assert (e2e["source_size"], e2e["image_size"], e2e["steps"]) == (64, 32, 4)
  assert e2e["images_per_sec"] > 0 and e2e["iterator_images_per_sec"] > 0
  assert e2e["bare_step_images_per_sec"] == step["images_per_sec"]
  assert isinstance(e2e["input_bound"], bool) and e2e["verdict"].split(":")[0] in (
      "input-bound", "loop-bound", "device-bound")
  table = (out / "accelerator.txt").read_text()
  assert "| vgg16_bn | float32 | 32/4 |" in table and "end to end" in table and table in proc.stdout
