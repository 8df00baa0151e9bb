"""Two ranks under mpirun: distributed solves, rank-consistency errors, DDP training, helpers.

Each script in tests/mpi/ runs once under ``mpirun -n 2`` (one torch thread per rank, a timeout
around the launch and a watchdog inside each rank) and writes one JSON file per rank; the tests
below read them. References are one-rank solves of the whole batch, run inside the same processes
with ``comm=None``. Tolerances: the distributed solve does the same arithmetic as the one-rank
solve up to the order of global sums, so outputs and gradients agree to round-off (observed
<= 1e-15); 1e-10 leaves room for GMRES iterates that differ by round-off in cn, whose linear and
nonlinear solves run to 1e-13.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from typing import Optional

import pytest

MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (apt-get install openmpi-bin)")

TESTS = os.path.dirname(os.path.abspath(__file__))
RANKS = 2
TOL = 1e-10

METHODS = ["rk4", "dopri5", "cn", "rk4+ck", "dopri5+ck", "cn+ck"]  # +ck: options['checkpoints'] = 2
SPLITS = ["even", "uneven", "tuple"]
ALL_MODES = ["ddp_distributed", "ddp_independent", "allreduce_distributed", "allreduce_distributed_uneven",
             "ddp_distributed_uneven"]
TRAINING_MODES = {"rk4": ALL_MODES, "dopri5": ALL_MODES, "cn": ["ddp_distributed", "ddp_independent"]}


class Launch:
    """One ``mpirun -n 2`` run of a rank script: return code, output, and each rank's JSON results."""

    def __init__(self, script: str, out_dir, timeout: float, watchdog: float, extra_env: Optional[dict] = None):
        rank_env = {"OMP_NUM_THREADS": "1", "PNODE_TEST_OUT": str(out_dir), "PNODE_TEST_WATCHDOG": str(watchdog),
                    "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
                    **(extra_env or {})}
        forwarded = [arg for name in rank_env for arg in ("-x", name)]
        self.command = [MPIRUN, "--allow-run-as-root", "--oversubscribe", *forwarded, "-n", str(RANKS),
                        sys.executable, os.path.join(TESTS, "mpi", script)]
        proc = subprocess.Popen(self.command, env={**os.environ, **rank_env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            self.output, _ = proc.communicate(timeout=timeout)
            self.timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # mpirun and the ranks it started, nothing else
            self.output, _ = proc.communicate()
            self.timed_out = True
        self.returncode = proc.returncode
        self.results = [_read_json(os.path.join(out_dir, f"rank{rank}.json")) for rank in range(RANKS)]

    def check(self) -> "Launch":
        """Fail with mpirun's output unless both ranks finished and wrote their results."""
        if self.timed_out or self.returncode != 0 or None in self.results:
            pytest.fail(f"{' '.join(self.command)} {'timed out' if self.timed_out else 'failed'} "
                        f"(return code {self.returncode}):\n{self.output[-6000:]}")
        return self


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def launch(tmp_path_factory, script: str, timeout: float = 120, watchdog: float = 90,
           extra_env: Optional[dict] = None) -> Launch:
    out_dir = tmp_path_factory.mktemp(script.replace(".py", ""))
    return Launch(script, out_dir, timeout, watchdog, extra_env)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    return launch(tmp_path_factory, "equivalence.py").check().results


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return launch(tmp_path_factory, "training.py", extra_env=env).check().results


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    return launch(tmp_path_factory, "helpers.py", timeout=60, watchdog=30).check().results


# ---------------------------------------------------------------- one distributed system
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("method", METHODS)
def test_split_batch_matches_whole_batch_on_one_rank(equivalence, method, split):
    errors = equivalence[0][f"{method}/{split}"]
    assert errors["outputs"] <= TOL
    assert errors["y0_grad"] <= TOL
    assert errors["param_grad"] <= TOL, "the sum over ranks of the local parameter gradients"


def test_parameter_gradients_are_local_contributions(equivalence):
    # Each rank's parameter gradient covers its own rows only: far from the whole gradient.
    for key, errors in equivalence[0].items():
        if key != "rows":
            assert errors["local_param_grad_vs_full"] > 0.1, key


def test_uneven_split_is_uneven(equivalence):
    assert [r["rows"] for r in equivalence] == [[2, 4], [2, 3]]


# ---------------------------------------------------------------- ranks that disagree
@pytest.mark.parametrize("case,detail", [("method", ("'rk4'", "'euler'")), ("times", ()),
                                         ("parameters", ("67", "75"))])
def test_disagreeing_ranks_all_raise_input_error(helpers, case, detail):
    messages = [r["disagree"][case]["message"] for r in helpers]
    assert [r["disagree"][case]["raised"] for r in helpers] == ["InputError"] * RANKS
    assert messages[0] == messages[1], "every rank raises the same error"
    assert "ranks disagree on the solve" in messages[0]
    for text in detail:
        assert text in messages[0]


def test_ranks_solve_together_after_disagreeing(helpers):
    assert [r["disagree"]["agreeing"]["raised"] for r in helpers] == [None] * RANKS


def test_changing_one_ranks_batch_size(tmp_path_factory):
    run = launch(tmp_path_factory, "resize.py", timeout=40, watchdog=30)
    run.check()
    assert all(e <= TOL for r in run.results for e in r["errors"])


# ---------------------------------------------------------------- data-parallel training
@pytest.mark.parametrize("method,mode", [(m, mode) for m, modes in TRAINING_MODES.items() for mode in modes])
def test_training_matches_single_process_full_batch(training, method, mode):
    for result in training:
        errors = result[method][mode]
        assert errors["first_grad"] <= TOL
        assert errors["params"] <= TOL
        assert errors["params_differ_between_ranks"] == 0.0


def test_training_covers_the_declared_modes(training):
    assert {m: sorted(training[0][m]) for m in TRAINING_MODES} == {m: sorted(v) for m, v in TRAINING_MODES.items()}


def test_independent_adaptive_solves_differ_from_full_batch_by_the_tolerance(training):
    # With comm=None each rank's dopri5 picks its own steps: a different (equally valid)
    # discretisation, within the tolerance (1e-6) of the full-batch one.
    assert training[0]["dopri5"]["ddp_independent"]["vs_full_batch_params"] < 1e-5


def test_torch_distributed_started_from_mpi(training):
    for rank, result in enumerate(training):
        env = result["env"]
        assert env["RANK"] == env["OMPI_COMM_WORLD_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["OMPI_COMM_WORLD_SIZE"] == str(RANKS)
        assert (env["torch_rank"], env["torch_world_size"]) == (rank, RANKS)


# ---------------------------------------------------------------- helpers
def test_rank_and_size_accept_any_communicator(helpers):
    for rank, result in enumerate(helpers):
        assert set(map(tuple, result["rank_size"].values())) == {(rank, RANKS)}


def test_print0_and_seeds(helpers):
    assert [r["print0"] for r in helpers] == ["hello from 0\n", ""]
    assert [r["seeds"] for r in helpers] == [{"per_rank": 5, "shared": 5}, {"per_rank": 6, "shared": 5}]


def test_average_and_sum_gradients(helpers):
    for result in helpers:
        grads = result["gradients"]
        assert grads["averaged"] == {"a": [[1.5] * 3] * 2, "b": [0.0, 1.5, 3.0, 4.5], "unused_grad_is_none": True}
        assert grads["summed_after_averaging"] == {"a": [[3.0] * 3] * 2, "b": [0.0, 3.0, 6.0, 9.0]}
        assert grads["mismatched_error"]["raised"] == "InputError"
        assert "ranks disagree on the gradients to reduce" in grads["mismatched_error"]["message"]


def test_broadcast_parameters(helpers):
    result = helpers[0]["broadcast"]
    before, after = result["before_by_rank"], result["after_by_rank"]
    assert before[0] != before[1], "the ranks started from different weights and statistics"
    assert after == [before[0], before[0]]
    for r in helpers:
        assert "ranks disagree on the module's parameters" in r["broadcast"]["mismatched_error"]["message"]


def test_shard_dataset(helpers):
    data = [r["datasets"] for r in helpers]
    assert [d["padded"] for d in data] == [[10, 12, 14], [11, 13, 10]]
    assert [d["drop_last"] for d in data] == [[10, 12], [11, 13]]
    shuffled = data[0]["shuffled_by_rank"]
    assert len(shuffled[0]) == len(shuffled[1]) == 3 and set(shuffled[0] + shuffled[1]) == set(range(10, 15))
    assert shuffled[0] + shuffled[1] != [10, 12, 14, 11, 13, 10], "shuffled"
    assert data[0]["tiny_by_rank"] == [[7], [7]]
    assert [d["shard"] for d in data] == [[0, 3], [3, 5]]


def test_metrics(helpers):
    for result in helpers:
        metrics = result["metrics"]
        assert metrics["sum"] == {"correct": 3.0, "seen": 20.0}
        assert metrics["average"] == {"loss": 3.0}
        assert (metrics["allreduce_sum"], metrics["allreduce_mean"]) == (3, 1.5)
        assert "ranks disagree on the metric names" in metrics["mismatched_error"]["message"]
