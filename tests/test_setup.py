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


# ------------------------------------------------------------------ the CUDA build's options
def fake_cuda_machine(root: Path, petsc_kind: str = "") -> dict:
    """A venv holding torch's CUDA 13 layout (nvidia/cu13 with versioned libraries), an nvcc that names its
    toolkit like the real one (``--dryrun`` prints ``TOP``), and the environment that points at them.
    ``petsc_kind``: what the venv's PETSc says it was built for ('cuda', 'cpu'; '' for no python)."""
    venv = root / "venv"
    cu = venv / "lib" / "python3.11" / "site-packages" / "nvidia" / "cu13"
    (cu / "include").mkdir(parents=True)
    (cu / "lib").mkdir()
    for name in ("libcudart.so.13", "libcublas.so.13", "libcusparse.so.12"):
        (cu / "lib" / name).write_text("")
    toolkit = root / "cuda"
    (toolkit / "include" / "cccl").mkdir(parents=True)
    (toolkit / "bin").mkdir()
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={toolkit}/bin/..' >&2\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    if petsc_kind:
        python = venv / "bin" / "python"
        python.parent.mkdir(parents=True)
        script = f"#!/bin/sh\ncase \"$*\" in *hasExternalPackage*) echo {petsc_kind} ;; *) echo double ;; esac\n"
        python.write_text(script)
        python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return {"VENV": str(venv), "NVCC": str(nvcc), "CU": str(cu), "TOOLKIT": str(toolkit)}


def run_setup(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SETUP), *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60)


def test_the_cuda_build_takes_the_toolkits_headers_first_and_torchs_libraries(tmp_path):
    machine = fake_cuda_machine(tmp_path)
    proc = run_setup({**machine, "PNODE_CUDA": "1", "PNODE_CUDA_ARCH": "80"}, "--print-petsc-options")
    assert proc.returncode == 0, proc.stderr
    options = proc.stdout.split()
    toolkit, cu, venv = machine["TOOLKIT"], machine["CU"], machine["VENV"]
    assert options[:2] == ["--with-fc=0", "--with-debugging=0"]
    assert f"--with-cudac={machine['NVCC']}" in options and "--with-cuda=1" in options
    assert "--with-cuda-arch=80" in options
    # the toolkit's include folder (crt/, cccl/) before torch's headers: torch's alone lack crt/host_config.h
    assert f"--with-cuda-include=[{toolkit}/include,{cu}/include,{toolkit}/include/cccl]" in options
    links = Path(venv) / "cuda-link"
    assert (f"--with-cuda-lib=[-L{links},-L{cu}/lib,-lcudart,-lnvtx3interop,-lcufft,-lcublas,-lcusparse,"
            "-lcusolver,-lcurand]") in options
    assert os.readlink(links / "libcublas.so") == f"{cu}/lib/libcublas.so.13"
    assert os.readlink(links / "libcusparse.so") == f"{cu}/lib/libcusparse.so.12"


def test_the_cpu_build_options_are_unchanged_without_cuda(tmp_path):
    machine = fake_cuda_machine(tmp_path)
    proc = run_setup({**machine, "PNODE_CUDA": "0"}, "--print-petsc-options")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["--with-fc=0", "--with-debugging=0"]


def test_a_cuda_build_without_torchs_cuda_libraries_says_what_it_needs(tmp_path):
    machine = fake_cuda_machine(tmp_path)
    proc = run_setup({**machine, "VENV": str(tmp_path / "empty"), "PNODE_CUDA": "1"}, "--print-petsc-options")
    assert proc.returncode == 2
    assert "needs torch's CUDA 13 headers and libraries" in proc.stderr


def test_setup_refuses_a_cuda_build_into_a_venv_with_a_cpu_petsc(tmp_path):
    machine = fake_cuda_machine(tmp_path, petsc_kind="cpu")
    proc = run_setup({**machine, "PNODE_CUDA": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "already has a PETSc built for cpu, but PNODE_CUDA=1 asks for cuda" in proc.stderr
    assert "PNODE_CUDA=1 VENV=.venv-cuda bash scripts/setup.sh" in proc.stderr


def test_a_gpu_machine_keeps_the_cpu_petsc_a_venv_already_has(tmp_path):
    machine = fake_cuda_machine(tmp_path, petsc_kind="cpu")
    (Path(machine["VENV"]) / ".pnode-setup-done").write_text("")
    smi = tmp_path / "smi" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    proc = run_setup({**machine, "PATH": f"{smi.parent}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    assert "keeping" in proc.stdout and "built for cpu" in proc.stdout
    assert "PNODE_CUDA=1 VENV=.venv-cuda bash scripts/setup.sh makes one" in proc.stdout
