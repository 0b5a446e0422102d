"""The documents stand alone: every link resolves inside the repository, every named command exists.

A user clones only this repository, so a link to `../shared/...`, to a file
git ignores or to a heading that was renamed is a dead end for them. The
checkers take the repository root, so the planted-problem test below runs
them on a small tree in tmp_path and sees them fail.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_COMMAND = "python -m pytest -q"  # .ci/run runs the README's test command

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_EXTERNAL = re.compile(r"^(?:https?:|mailto:)", re.I)
# Files of the repository's entry points, configs and benchmarks that a document names.
_NAMED_FILE = re.compile(r"(?<![\w/.-])((?:launch|benchmarks|configs)/[\w.-]+\.(?:py|sh|sbatch))\b")


def documents(root: pathlib.Path) -> list[pathlib.Path]:
  """README.md, docs/*.md, benchmarks/README.md and results/**/README.md, those that exist."""
  found = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "benchmarks" / "README.md",
           *sorted((root / "results").glob("**/README.md"))]
  return [p for p in found if p.is_file()]


def split_markdown(text: str) -> tuple[str, list[str]]:
  """(the prose with fenced blocks and code spans blanked, the ATX heading texts), as GitHub reads them."""
  prose, headings, fence = [], [], None
  for line in text.splitlines():
    match = _FENCE.match(line)
    if fence is not None:
      if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
        fence = None
      prose.append("")
      continue
    if match:
      fence = match.group(1)
      prose.append("")
      continue
    prose.append(line)
    heading = _HEADING.match(line)
    if heading:
      headings.append(heading.group(2))
  return _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), "\n".join(prose)), headings


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: links reduced to their text, lowercase, punctuation dropped, spaces to '-'."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
  return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  """Every anchor GitHub gives the headings of `path`; a repeated heading gets -1, -2, ..."""
  found: set[str] = set()
  seen: dict[str, int] = {}
  for heading in split_markdown(path.read_text(encoding="utf-8"))[1]:
    base = slug(heading)
    count = seen.get(base, 0)
    seen[base] = count + 1
    found.add(base if count == 0 else f"{base}-{count}")
  return found


def links(text: str) -> list[str]:
  """Targets of the inline links, images and reference definitions outside code."""
  prose, _ = split_markdown(text)
  return _LINK.findall(prose) + _REFERENCE.findall(prose)


def shipped_files(root: pathlib.Path) -> set[pathlib.Path] | None:
  """Files a clone would hold (tracked, or untracked and not ignored), or None outside a git work tree."""
  try:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return {(root / name).resolve() for name in out.decode().split("\0") if name}


def link_problems(root: pathlib.Path) -> list[str]:
  """One line per link of the documents that a clone of `root` could not follow."""
  root = root.resolve()
  shipped = shipped_files(root) if (root / ".git").exists() else None
  problems = []
  for doc in documents(root):
    where = doc.relative_to(root).as_posix()
    for target in links(doc.read_text(encoding="utf-8")):
      if _EXTERNAL.match(target):
        continue
      path, _, anchor = urllib.parse.unquote(target).partition("#")
      if not path and not anchor:
        problems.append(f"{where}: empty link target")
        continue
      if path.startswith("/") or re.match(r"^[a-z][a-z0-9+.-]*:", path, re.I):
        problems.append(f"{where}: {target} is not a path relative to the document")
        continue
      resolved = (doc.parent / path).resolve() if path else doc
      if not resolved.is_relative_to(root):
        problems.append(f"{where}: {target} leaves the repository")
        continue
      if not resolved.exists():
        problems.append(f"{where}: {target} does not exist")
        continue
      if shipped is not None and not (resolved in shipped or any(f.is_relative_to(resolved) for f in shipped
                                                                    if resolved.is_dir())):
        problems.append(f"{where}: {target} is ignored by git, so a clone lacks it")
        continue
      if anchor and resolved.suffix.lower() == ".md" and anchor not in anchors(resolved):
        problems.append(f"{where}: {target} names no heading of {resolved.relative_to(root).as_posix()}")
  return problems


def command_problems(root: pathlib.Path) -> list[str]:
  """The launch/, benchmarks/ and configs/ files that README.md (commands included) names but lacks."""
  text = (root / "README.md").read_text(encoding="utf-8")
  return [f"README.md names {name}, which does not exist" for name in sorted(set(_NAMED_FILE.findall(text)))
          if not (root / name).is_file()]


def test_every_document_link_resolves_to_a_file_in_the_repository():
  assert link_problems(ROOT) == []


def test_every_script_and_config_the_readme_names_exists():
  text = (ROOT / "README.md").read_text(encoding="utf-8")
  commands = re.findall(r"python (?:launch|benchmarks)/\S+\.py", text)
  assert "python launch/train.py" in text and commands, "the README names no python launch/*.py command"
  assert re.search(r"--config=configs/\S+\.py", text)
  assert command_problems(ROOT) == []


def test_the_readme_keeps_the_ci_test_command():
  assert TEST_COMMAND in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("heading, expected", [
    ("Set-up", "set-up"),
    ("Training on the paper's datasets", "training-on-the-papers-datasets"),
    ("The paper's tables (sweeps)", "the-papers-tables-sweeps"),
    ("1. Official split: does DSN help? (`runs/main/table8.md`)", "1-official-split-does-dsn-help-runsmaintable8md"),
    ("Your own folder: `image_folder`", "your-own-folder-image_folder"),
    ("See [the design](docs/design.md) now", "see-the-design-now"),
])
def test_slug_follows_githubs_rules(heading, expected):
  assert slug(heading) == expected


def test_the_checkers_find_planted_problems(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "launch").mkdir()
  (tmp_path / "configs").mkdir()
  (tmp_path / "launch" / "train.py").write_text("")
  (tmp_path / "configs" / "default.py").write_text("")
  (tmp_path / "docs" / "design.md").write_text("# Design\n\n## A heading, with (punctuation)\n\n## Repeated\n\n"
                                               "## Repeated\n\n```bash\n# not a heading\n```\n")
  (tmp_path / "README.md").write_text(
      "# Tool\n\n## Set-up\n\n"
      "[ok](docs/design.md) [ok](docs/design.md#a-heading-with-punctuation) [ok](docs/design.md#repeated-1)\n"
      "[ok](#set-up) [ok](https://example.org/x.md) [ok](docs/) ![ok](docs/design.md)\n"
      "[missing](docs/missing.md) ![missing image](docs/plot.png)\n"
      "[outside](../shared/DESIGN.md) [absolute](/etc/passwd)\n"
      "[bad anchor](docs/design.md#no-such-heading) [bad own anchor](#nope)\n"
      "[code heading](docs/design.md#not-a-heading) [multi\nline](docs/gone.md)\n\n"
      "`[in code](docs/ignored.md)`\n\n```\n[in a block](docs/ignored.md)\n```\n\n"
      "[ref]: docs/also-missing.md\n\n"
      "```bash\npython launch/train.py --config=configs/default.py\n"
      "python launch/nope.py --config=configs/missing.py:baseline\npython benchmarks/gone.py\n```\n")
  assert link_problems(tmp_path) == [
      "README.md: docs/missing.md does not exist",
      "README.md: docs/plot.png does not exist",
      "README.md: ../shared/DESIGN.md leaves the repository",
      "README.md: /etc/passwd is not a path relative to the document",
      "README.md: docs/design.md#no-such-heading names no heading of docs/design.md",
      "README.md: #nope names no heading of README.md",
      "README.md: docs/design.md#not-a-heading names no heading of docs/design.md",
      "README.md: docs/gone.md does not exist",
      "README.md: docs/also-missing.md does not exist",
  ]
  assert command_problems(tmp_path) == [
      "README.md names benchmarks/gone.py, which does not exist",
      "README.md names configs/missing.py, which does not exist",
      "README.md names launch/nope.py, which does not exist",
  ]


def test_a_link_to_a_file_git_ignores_is_a_problem(tmp_path):
  git = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
  try:
    git("init", "-q")
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("git is not available")
  (tmp_path / ".gitignore").write_text("/runs/\n")
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "table.md").write_text("# Table\n")
  (tmp_path / "README.md").write_text("# Tool\n\n[table](runs/table.md) [self](README.md)\n")
  assert link_problems(tmp_path) == ["README.md: runs/table.md is ignored by git, so a clone lacks it"]


def test_the_layout_table_names_every_module_and_nothing_gone():
  """docs/design.md's Layout table is the map of the package: every module on it, no module it names missing."""
  layout = (ROOT / "docs" / "design.md").read_text().split("## Layout", 1)[1]
  package = ROOT / "dsn_saal_jax"
  modules = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
  modules |= {p.name + "/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
  named = set(re.findall(r"`(?:dsn_saal_jax/)?([a-z_0-9]+(?:\.py|/))`", layout))
  assert modules - named == set(), "modules missing from docs/design.md's Layout table"
  top_level = {n for n in named if n.endswith(".py") and (package / n).exists() or n.endswith("/")}
  gone = {n for n in named if n.endswith(".py") and n not in top_level
          and not any(package.glob(f"**/{n}")) and not (ROOT / "launch" / n).exists()}
  assert gone == set(), "the Layout table names modules that do not exist"
