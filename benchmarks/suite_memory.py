"""Peak memory of a command and all its descendants together, for the test suite's 8 GB budget.

`/usr/bin/time -v` reports the largest single process; with pytest-xdist
workers and the tests' own subprocesses running side by side, what the
machine must hold is their sum. This samples it (PSS, once a second) and
names the processes that made up the peak.

  python benchmarks/suite_memory.py -- python -m pytest -q
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def tree_memory(root: psutil.Process) -> tuple[int, list[tuple[int, str]]]:
  """Proportional set size (PSS) of `root` and every live descendant, summed, and each one's share.

  PSS splits shared pages (jaxlib's, TensorFlow's and torch's libraries are mapped by every worker)
  between the processes that map them, so the sum is what the machine holds; summed RSS would count
  each library once per process.
  """
  parts = []
  for p in [root, *root.children(recursive=True)]:
    try:
      info = p.memory_full_info()
      parts.append((getattr(info, "pss", info.rss), " ".join(p.cmdline())[:100]))
    except psutil.Error:  # exited between listing and reading
      pass
  return sum(b for b, _ in parts), sorted(parts, reverse=True)


def main(argv: list[str]) -> int:
  if "--" not in argv:
    sys.exit(__doc__)
  command = argv[argv.index("--") + 1:]
  start = time.monotonic()
  proc = subprocess.Popen(command)
  root, peak, peak_at, peak_parts = psutil.Process(proc.pid), 0, 0.0, []
  while proc.poll() is None:
    try:
      total, parts = tree_memory(root)
    except psutil.NoSuchProcess:
      break
    if total > peak:
      peak, peak_at, peak_parts = total, time.monotonic() - start, parts
    time.sleep(1.0)
  wall = time.monotonic() - start
  print(f"suite_memory: exit {proc.returncode}, wall {wall / 60:.1f} min, peak PSS of the process tree "
        f"{peak / 2**30:.2f} GiB at {peak_at / 60:.1f} min (sampled every second); then:", file=sys.stderr)
  for size, command in peak_parts:
    print(f"  {size / 2**30:5.2f} GiB  {command}", file=sys.stderr)
  return proc.returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv))
