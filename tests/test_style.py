"""The code style configured in pyproject.toml holds for the whole repository: `ruff check .` (lint,
import order) and `ruff format --check .` (one formatting). Fix with `ruff check --fix . && ruff format .`."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args):
    exe = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_lint_passes():
    proc = _ruff("check", ".", "--output-format=concise")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_ruff_format_is_applied():
    proc = _ruff("format", "--check", ".")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
