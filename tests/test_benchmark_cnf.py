"""Smoke test of ``python -m benchmarks.cnf``: a quick run in a subprocess, and the JSON and markdown it writes.

Every row trains the CNF example's digits flow from the same weights on the same batches and
probes, so their test NLLs start equal and stay within the solvers' tolerance of each other.
"""

import pytest
from test_benchmarks import load, run_benchmark

ROWS = ("*/pnode:default", "*/pnode:adjoint=graphs", "*/torchdiffeq-odeint")


@pytest.fixture(scope="module")
def cnf_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cnf")
    stdout = run_benchmark("benchmarks.cnf", out_dir, "--rows", *ROWS)
    return (*load(out_dir, "cnf"), stdout)


def test_cnf_rows(cnf_run):
    doc, _, _ = cnf_run
    default, graphs, odeint = (entry["result"] for entry in doc["rows"])
    for result in (default, graphs, odeint):
        assert "error" not in result, result
        assert result["time_s"] > 0 and result["peak_mb"] > 0 and result["iterations"] == 2
        assert result["test_nll"] < result["initial_nll"]  # two Adam steps on the same batches
    assert default["initial_nll"] == graphs["initial_nll"] == odeint["initial_nll"]  # the same weights
    assert abs(default["test_nll"] - graphs["test_nll"]) < 1e-9  # pnode's strategies: the same gradients
    assert abs(default["test_nll"] - odeint["test_nll"]) < 0.05  # another solver's steps, the same model
    assert default["nfe_backward"] > 0 and graphs["nfe_backward"] == 0 and odeint["nfe_backward"] == 0
    assert default["adjoint"]["strategy"] == "states" and graphs["adjoint"]["strategy"] == "graphs"
    assert "diagonal_gaussian" in default["baselines"]


def test_cnf_markdown(cnf_run):
    doc, markdown, stdout = cnf_run
    assert markdown == stdout.rstrip("\n") + "\n"
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| row | time / iteration (s) | time × odeint | NFE-F / NFE-B |")
    assert [line.split(" | ")[0] for line in table[1:]] == ["| pnode default", "| pnode adjoint=graphs",
                                                             "| torchdiffeq odeint"]
    assert table[-1].split(" | ")[2] == "1.00"  # odeint's time over its own
    assert doc["command"] in markdown
