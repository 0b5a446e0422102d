"""Runs several launch/ script invocations in one process: JAX and TensorFlow are imported once for all.

  python tests/launch_batch.py INVOCATIONS.json RESULTS.json

INVOCATIONS.json is a list of argv lists, [["launch/predict.py", "--workdir=...", ...], ...]. Each runs
as `python SCRIPT ARGS...` would (runpy as __main__, sys.argv as given, its own cwd and fresh absl flags),
one after another; RESULTS.json gets [{"returncode", "stdout", "stderr"}, ...] in the same order, each
captured at the file-descriptor level as a subprocess's would be. Use `run` from a test.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class Result:
  """The parts of subprocess.CompletedProcess the tests read."""

  def __init__(self, returncode: int, stdout: str, stderr: str):
    self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(invocations, tmp_path, timeout=900) -> list[Result]:
  """Runs `invocations` ([script name under launch/, *args] each) in one fresh process with cwd `tmp_path`."""
  tmp_path = str(tmp_path)
  argvs = [[os.path.join(ROOT, "launch", script), *map(str, args)] for script, *args in invocations]
  spec, results = os.path.join(tmp_path, "launch_batch.json"), os.path.join(tmp_path, "launch_batch.out.json")
  with open(spec, "w") as f:
    json.dump(argvs, f)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), spec, results], env=env, capture_output=True,
                        text=True, timeout=timeout, cwd=tmp_path)
  assert proc.returncode == 0 and os.path.exists(results), proc.stderr[-4000:]
  with open(results) as f:
    return [Result(**r) for r in json.load(f)]


def _run_one(argv: list[str]) -> int:
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,unused-import
  app.define_help_flags()  # kept: absl defines them once per process
  before, modules = set(flags.FLAGS), set(sys.modules)
  # app.run initializes once per process; each script gets the whole of it (it sets --verbosity's default).
  app._run_init.done = app._register_and_parse_flags_with_usage.done = False  # pylint: disable=protected-access
  sys.argv = list(argv)
  try:
    runpy.run_path(argv[0], run_name="__main__")
    return 0
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(e.code, file=sys.stderr)
    return 1
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    return 1
  finally:
    imported = set(sys.modules) - modules
    # the next script defines its flags afresh (itself, through dsn_saal_jax.cli, --config.KEY's); a
    # library first imported in this run keeps its own: it defines them once, at import, and stays imported
    for name in set(flags.FLAGS) - before:
      module = flags.FLAGS.find_module_defining_flag(name, "__main__")  # a script's: its path
      if module not in imported or module.startswith("dsn_saal_jax"):
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


def main() -> None:
  spec, out = sys.argv[1:3]
  with open(spec) as f:
    argvs = json.load(f)
  results = []
  for argv in argvs:
    captured = {}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}
    for fd, file in files.items():
      os.dup2(file.fileno(), fd)
    try:
      code = _run_one(argv)
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      for fd, file in files.items():
        os.dup2(saved[fd], fd)
        os.close(saved[fd])
        file.seek(0)
        captured[fd] = file.read().decode(errors="replace")
        file.close()
    results.append({"returncode": code, "stdout": captured[1], "stderr": captured[2]})
  with open(out, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main()
