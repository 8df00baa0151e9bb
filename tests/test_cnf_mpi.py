"""The CNF example under ``mpirun -n 2``: one model, the same as one process's, to round-off.

``tests/mpi/cnf_equivalence.py`` compares the example's loss and averaged gradients on 2 ranks with
one process holding the whole batch (float64; both MPI modes, exact and Hutchinson traces, with and
without regularisers). The end-to-end test runs ``examples/cnf.py`` itself on 1 and on 2 ranks from
the same seed and compare the checkpoints: the same parameters after Adam steps, one log, one
checkpoint. Observed errors are ~1e-16 (the order of the sums over ranks); 1e-12 is the bound.
The weak-scaling script's CNF workload runs on 1 and 2 ranks.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch
from test_mpi import MPIRUN, launch

pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (apt-get install openmpi-bin)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-12


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    return launch(tmp_path_factory, "cnf_equivalence.py", timeout=180, watchdog=150).check().results


def test_two_ranks_give_one_process_loss_and_gradients(equivalence):
    assert len(equivalence[0]) == 8
    for case, errors in equivalence[0].items():
        assert errors["loss"] <= TOL, case
        assert errors["grads"] <= TOL, case
        assert errors["grad_norm"] > 1e-3, case  # a gradient that is there to compare


def test_the_batch_was_split_unevenly(equivalence):
    assert {r["rows"] for r in equivalence[0].values()} == {4.0}
    assert {r["rows"] for r in equivalence[1].values()} == {3.0}


def _run_example(out, ranks, *args, timeout=240):
    command = [sys.executable, os.path.join(ROOT, "examples", "cnf.py"), *args, "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get(
        "PYTHONPATH")])))
    if ranks > 1:
        command = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH",
                   "-n", str(ranks), *command]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpirun and the ranks it started, nothing else
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} timed out:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


TINY = ["--data", "digits", "--niters", "3", "--log-every", "3", "--batch-size", "24", "--hidden", "12",
        "--blocks", "2", "--test-size", "20", "--kinetic", "0.05", "--jacobian", "0.05", "--plot-samples", "4"]


def test_the_example_on_two_ranks_trains_one_processs_model(tmp_path):
    # the default mode (one distributed PETSc system) with dopri5; cnf_equivalence.py covers both modes
    _run_example(tmp_path / "one", 1, *TINY)
    output = _run_example(tmp_path / "two", 2, *TINY)
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert one["iteration"] == two["iteration"] == 3
    for name, value in one["model"].items():
        difference = float((value - two["model"][name]).abs().max())
        assert difference <= TOL * max(1.0, float(value.abs().max())), name
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["test_nll"] - b["test_nll"]) <= TOL * abs(a["test_nll"])
    # one log (rank 0's), one checkpoint, one figure
    assert sorted(os.listdir(tmp_path / "two")) == ["checkpoint.pt", "cnf_digits.png", "log.txt", "metrics.jsonl"]
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "ranks: 2" in log and "data parallel: 2 rank(s), global batch 24, distributed" in log
    assert output.count("done: test NLL") == 1


def test_weak_scaling_script_runs_the_cnf_workload(tmp_path):
    # Every rank holds the same rows, so the distributed dopri5 solve takes one rank's steps: the
    # evaluation counts of the 2-rank row equal the 1-rank row's.
    markdown = tmp_path / "scaling.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_scaling.py"), "--workload", "cnf",
                           "--methods", "dopri5", "--modes", "distributed", "--batch", "8", "--repeats", "1",
                           "--markdown", str(markdown)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split(" | ") for line in markdown.read_text().splitlines() if line.startswith("| dopri5 |")]
    assert [(r[1], r[2]) for r in rows] == [("-", "1"), ("distributed", "2")]
    assert len({r[8] for r in rows}) == 1, rows  # NFE-F / NFE-B
    assert "CNF training step of the digits flow" in markdown.read_text()
