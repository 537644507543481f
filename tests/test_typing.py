"""mypy stays clean over the package (the project rule: type hints on public APIs).

Two runs. The first is the folder-by-folder command of the project's docs; there mypy
cannot follow pyproject's package-dir (marshal/ is mrpcd.marshal, ...), so what one folder
imports from another is unresolved (Any) and --ignore-missing-imports is needed. The
second checks the package as it installs: a tree of links laying the folders out under
mrpcd/, checked with pyproject's [tool.mypy] (which names the few modules that stay
unresolved), so the types across folders are checked too.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["marshal", "transports", "policies", "stubgen", "native"]  # mapped under mrpcd (pyproject)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is not installed (it comes with the test extra: pip install -e '.[test]')")


def _mypy(args: list[str], cwd: Path, cache: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", *args, "--no-incremental", "--cache-dir", str(cache)],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mypy found errors:\n{proc.stdout}{proc.stderr}"


def test_mypy_is_clean_folder_by_folder(tmp_path):
    _mypy([str(ROOT / d) for d in ["mrpcd", *FOLDERS]] + ["--ignore-missing-imports"], tmp_path, tmp_path / "cache")


def test_mypy_is_clean_over_the_package_as_installed(tmp_path):
    pkg = tmp_path / "tree" / "mrpcd"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "mrpcd").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for folder in FOLDERS:
        (pkg / folder).symlink_to(ROOT / folder)
    _mypy(["--config-file", str(ROOT / "pyproject.toml"), "-p", "mrpcd"], pkg.parent, tmp_path / "cache")
