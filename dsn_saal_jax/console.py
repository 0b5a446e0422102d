"""What the launch scripts print: this project's progress lines and every warning, more with `--verbosity`.

orbax, TensorFlow, TFDS and JAX log through the same absl handler as this
project, and at INFO their detail (orbax's, on every checkpoint save) buries
its few lines. absl's `--verbosity=V` (default 0) sets this project's
threshold; every library gets one level quieter:

  --verbosity  this project (dsn_saal_jax, launch/)     libraries, TensorFlow C++
  -1           warnings                                 errors
  0            INFO: start, one line per epoch, report  warnings
  1            DEBUG: the config, every logged step     INFO (orbax saves, TFDS builds)
  2 and up     absl's VLOG levels                       DEBUG

TensorBoard and history.jsonl get every logged scalar whatever the console shows.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import tempfile
import time
from typing import Iterable, Iterator, Sequence, TypeVar

from absl import logging as absl_logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# What TensorFlow's C++ code prints at INFO while it loads: the lines themselves and C++ absl's notice.
_TF_LOAD_CHATTER = re.compile(r"I\d{4} |WARNING: All log messages before absl::InitializeLog\(\)")
_T = TypeVar("_T")


def setup(argv: Sequence[str]) -> None:
  """Applies the policy above; call it at the top of a launch script, before anything imports TensorFlow.

  TensorFlow reads TF_CPP_MIN_LOG_LEVEL once, when it loads, which is before
  absl parses the flags; so `--verbosity` is read from `argv` here. An
  exported TF_CPP_MIN_LOG_LEVEL or TQDM_DISABLE is left as the user set it.
  """
  verbosity = argv_verbosity(argv)
  library = absl_logging.converter.absl_to_standard(verbosity - 1)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", str(min(max(1 - verbosity, 0), 3)))
  if verbosity <= 0:
    os.environ.setdefault("TQDM_DISABLE", "1")  # TFDS's build progress bars (tqdm reads TQDM_*)
    import_tensorflow_quietly()
  logging.getLogger("tensorflow").setLevel(library)  # tf.get_logger(), which may have its own handler
  own = (_PACKAGE_DIR, os.path.dirname(os.path.abspath(argv[0])))
  absl_logging.get_absl_handler().addFilter(_ConsoleFilter(tuple(d + os.sep for d in own)))


def argv_verbosity(argv: Sequence[str]) -> int:
  """`--verbosity` (or `-v`) in `argv` as absl will parse it, the last one winning; 0 when absent or bad."""
  value = "0"
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    name, eq, rest = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name in ("verbosity", "v"):
      value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else value)
  try:
    return int(value)
  except ValueError:  # absl reports it when it parses the flags
    return 0


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow without the INFO lines its C++ code prints while loading; the rest of stderr is kept.

  TF 2.21 prints them ("oneDNN custom operations are on", twice) through C++
  absl before that is initialised, where TF_CPP_MIN_LOG_LEVEL does not apply
  (abseil/abseil-cpp#1957). Every launch script loads TensorFlow anyway.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines(keepends=True):
        if not _TF_LOAD_CHATTER.match(line):
          sys.stderr.write(line)


class _ConsoleFilter(logging.Filter):
  """Passes this project's records at absl's verbosity and other records one level above it.

  The verbosity is read per record, so the filter follows absl's flag parsing
  and later `set_verbosity` calls.
  """

  def __init__(self, own_dirs: tuple[str, ...]):
    super().__init__()
    self._own_dirs = own_dirs

  def filter(self, record: logging.LogRecord) -> bool:
    verbosity = absl_logging.get_verbosity()
    if not os.path.abspath(record.pathname).startswith(self._own_dirs):
      verbosity -= 1
    return record.levelno >= absl_logging.converter.absl_to_standard(verbosity)


def progress(items: Iterable[_T], total: int, unit: str, every_s: float = 10.0) -> Iterator[_T]:
  """Yields `items`, showing done/total, rate and ETA on stderr, never stdout (which may carry a CSV or JSON).

  On a terminal a tqdm bar, after the first second; otherwise an INFO line
  every `every_s` seconds, and a last one when any was printed: a short run
  stays silent, a long one is never silent for long.
  """
  if sys.stderr.isatty():
    import tqdm  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    # disable=False: setup's TQDM_DISABLE is for TFDS's bars, not this one.
    yield from tqdm.tqdm(items, total=total, unit=f" {unit}", file=sys.stderr, delay=1.0, disable=False)
    return
  start = last = time.monotonic()
  done = 0
  for done, item in enumerate(items, 1):
    yield item
    now = time.monotonic()
    if now - last >= every_s:
      last = now
      rate = done / (now - start)
      eta = datetime.timedelta(seconds=round((total - done) / rate)) if done < total else "done"
      absl_logging.info("%d/%d %s (%.0f%%), %.1f %s/s, ETA %s", done, total, unit, 100 * done / max(total, 1),
                        rate, unit, eta)
  if last > start:
    absl_logging.info("%d/%d %s in %.0f s", done, total, unit, time.monotonic() - start)
