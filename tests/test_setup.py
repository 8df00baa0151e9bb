"""scripts/setup.sh refuses to mix PETSc precisions in one venv (one venv holds one PETSc)."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"


def fake_venv(root: Path, precision: str) -> Path:
    """A venv whose python answers every ``-c`` with the given PETSc precision."""
    python = root / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\necho {precision}\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return root


@pytest.mark.parametrize("have, want", [("double", "single"), ("single", "double")])
def test_setup_refuses_a_venv_with_the_other_precision(tmp_path, have, want):
    venv = fake_venv(tmp_path / "venv", have)
    env = dict(os.environ, VENV=str(venv), PETSC_PRECISION=want)
    proc = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"already has a {have}-precision PETSc, but PETSC_PRECISION={want}" in proc.stderr
    assert f"PETSC_PRECISION={want} VENV=.venv-{want} bash scripts/setup.sh" in proc.stderr


def test_setup_rejects_an_unknown_precision(tmp_path):
    env = dict(os.environ, VENV=str(tmp_path / "venv"), PETSC_PRECISION="half")
    proc = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "PETSC_PRECISION must be double or single, not 'half'" in proc.stderr
