"""Importing pnode has no side effects; PETSc is initialised on first use or by ``pnode.init(argv)``.

Each case runs in a fresh interpreter: PETSc is initialised once per process.
"""

import json
import subprocess
import sys
import textwrap

import pytest

# Runs two euler ODE blocks (one with the options prefix 'second_') and prints, as JSON, what PETSc
# ran for each: its RK type ('1fe' for euler), or its TS type when that is not RK.
SOLVE = textwrap.dedent("""
    import json, sys
    import torch
    import pnode
    {before}
    blocks = [pnode.ODEBlock(lambda t, y: -y, method="euler", options={{"step_size": 0.25}}),
              pnode.ODEBlock(lambda t, y: -y, method="euler", options={{"step_size": 0.25}}, prefix="second_")]
    for block in blocks:
        block(torch.ones(3, dtype=torch.float64))
    print(json.dumps([block.stats.solver.get("rk_type", block.stats.solver["ts_type"]) for block in blocks]))
""")


def run_python(code: str, *argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ts_types(before: str = "", argv=()) -> list:
    return json.loads(run_python(SOLVE.format(before=before), *argv).strip().splitlines()[-1])


def test_importing_pnode_initialises_neither_petsc_nor_mpi_nor_blas_threads():
    out = run_python(textwrap.dedent("""
        import sys
        import pnode
        assert 'petsc4py.PETSc' not in sys.modules, 'import pnode initialised PETSc'
        assert 'mpi4py.MPI' not in sys.modules, 'import pnode initialised MPI'
        from pnode import _compat
        assert _compat._PETSC is None
        print(repr(_compat.PETSc))
    """))
    assert "initialised on first use" in out


def test_command_line_options_reach_every_solver_without_an_init_call():
    assert ts_types() == ["1fe", "1fe"]
    assert ts_types(argv=["-ts_rk_type", "3"]) == ["3", "3"]
    assert ts_types(argv=["-ts_type", "beuler"]) == ["beuler", "beuler"]
    assert ts_types(argv=["-second_ts_rk_type", "3"]) == ["1fe", "3"]


def test_an_explicit_init_takes_the_options_given_instead_of_sys_argv():
    assert ts_types('pnode.init(["-ts_rk_type", "3"])', argv=["-ts_type", "beuler"]) == ["3", "3"]
    assert ts_types('pnode.init(["prog", "-second_ts_rk_type", "3"])') == ["1fe", "3"]


def test_init_after_petsc_was_initialised_adds_the_options_to_its_database():
    before = "from petsc4py import PETSc\npnode.init(['-ts_rk_type', '3'])"
    assert ts_types(before) == ["3", "3"]


def test_initialising_runs_petscs_openblas_on_one_thread():
    out = run_python(textwrap.dedent("""
        import ctypes, os
        os.environ.pop("OPENBLAS_NUM_THREADS", None)
        import pnode
        pnode.init([])
        libs = {line.split()[-1] for line in open("/proc/self/maps") if "libopenblas" in line.rsplit("/", 1)[-1]}
        print(sorted({ctypes.CDLL(lib).openblas_get_num_threads() for lib in libs}))
    """))
    threads = json.loads(out.strip())
    if not threads:
        pytest.skip("this PETSc does not link an OpenBLAS")
    assert threads == [1]
