"""The code base stays ruff-clean (rules in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the [test] extra")
def test_ruff_check_is_clean():
    proc = subprocess.run(
        ["ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_layers_are_kept():
    """import-linter's contracts in pyproject.toml: cli > studies > nn > analysis >
    curvature > linalg, and no flax, optax, orbax or matplotlib below nn."""
    lint_imports = shutil.which("lint-imports")
    assert lint_imports, "import-linter is in the [test] extra: pip install -e '.[test]'"
    proc = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_loads_the_engine_only():
    """``import hessspec`` loads JAX and the engine, not flax, optax, orbax or matplotlib."""
    code = (
        "import sys, hessspec; "
        "print([m for m in ('flax', 'optax', 'orbax', 'matplotlib') if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
