"""Set-up shared by the rank scripts that tests/test_mpi.py runs under ``mpirun -n 2``.

Importing this module pins torch to one thread and arms a watchdog: a rank that is still running
after ``PNODE_TEST_WATCHDOG`` seconds (a hang in a collective) dumps its stack and exits non-zero,
and mpirun then stops the other rank. The scripts import from tests/ (problems.py, conftest's
``rel_err``), so run one by hand from the repository root as::

    PYTHONPATH=tests PNODE_TEST_OUT=/tmp/out mpirun -n 2 .venv/bin/python tests/mpi/equivalence.py
"""

import faulthandler
import json
import os

import torch
from conftest import rel_err  # noqa: F401  (for the rank scripts)
from mpi4py import MPI

from pnode.distributed import shard


def arm_watchdog(seconds: float) -> None:
    """Exit non-zero with every thread's stack if this rank still runs in ``seconds`` (re-arms)."""
    faulthandler.dump_traceback_later(seconds, exit=True)


torch.set_num_threads(1)
arm_watchdog(float(os.environ.get("PNODE_TEST_WATCHDOG", "40")))

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()


def local_rows(n_rows: int) -> slice:
    """This rank's rows of a batch of ``n_rows`` (``pnode.distributed.shard`` as a slice)."""
    rows = shard(n_rows)
    return slice(rows.start, rows.stop)


def write_results(results: dict) -> None:
    """Write this rank's results as JSON to ``$PNODE_TEST_OUT/rank<r>.json``."""
    with open(os.path.join(os.environ["PNODE_TEST_OUT"], f"rank{RANK}.json"), "w") as fh:
        json.dump(results, fh, indent=1)


def gather_rows(local: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``local`` along ``dim`` in rank order (the whole batch)."""
    return torch.cat(COMM.allgather(local.detach()), dim)


def sum_over_ranks(local: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's ``local`` (e.g. local parameter-gradient contributions)."""
    return sum(COMM.allgather(local.detach()))
