"""Smoke test of the benchmark package: quick runs in a subprocess, and the JSON and markdown they write.

The benchmark code is not imported here: each entry point runs as ``python -m benchmarks...``, as
a person runs it, and its rows run in processes of their own.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGY_ROWS = ("odenet/rk4-16/torchdiffeq-odeint", "odenet/rk4-16/pnode:default")
# Solve tolerances a float32 network in a float64 PETSc can reach, so the implicit row converges
# whatever pnode's own defaults are; rk4 and cn at 4 steps keep the test short (beuler runs the
# same code with theta = 1).
IMPLICIT_OPTIONS = '{"snes_rtol": 1e-4, "ksp_rtol": 1e-6}'
IMPLICIT_ARGS = ("--steps", "4", "--options", IMPLICIT_OPTIONS, "--rows", "odenet/rk4-4/*", "odenet/cn-4/*")


def run_benchmark(module, out_dir, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--threads", "1", "--out", str(out_dir), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def load(out_dir, stem):
    with open(os.path.join(out_dir, stem + ".json")) as fh:
        doc = json.load(fh)
    with open(os.path.join(out_dir, stem + ".md")) as fh:
        return doc, fh.read()


def check_measured(entry):
    result = entry["result"]
    assert "error" not in result, (entry["id"], result)
    assert result["time_s"] > 0 and len(result["times_s"]) == 1
    assert result["peak_mb"] > 0 and result["held_mb"] >= -5  # allocator noise of a few MB at toy sizes
    assert result["memory"]


@pytest.fixture(scope="module")
def strategies(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("strategies")
    stdout = run_benchmark("benchmarks.strategies", out_dir, "--rows", *STRATEGY_ROWS)
    return (*load(out_dir, "strategies"), stdout, out_dir)


def test_strategies_rows_json(strategies):
    doc, _, _, out_dir = strategies
    assert [entry["id"] for entry in doc["rows"]] == list(STRATEGY_ROWS)
    for entry in doc["rows"]:
        check_measured(entry)
    odeint, pnode = doc["rows"]
    assert odeint["result"]["grad_error"] is None  # it is the reference of its own steps
    assert pnode["result"]["grad_error"] < 1e-5  # autograd through the same rk4 steps, pnode's arithmetic
    assert pnode["result"]["steps"] == 16
    assert pnode["result"]["evaluations"]["forward"]["f"] == 64  # 16 steps x 4 stages
    assert os.path.exists(os.path.join(out_dir, "strategies-odenet.png"))


def test_strategies_markdown(strategies):
    doc, markdown, stdout, _ = strategies
    assert markdown == stdout.rstrip("\n") + "\n"
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| row | time / step (s) | time × odeint |")
    odeint_line = next(line for line in table if line.startswith("| torchdiffeq odeint |"))
    assert odeint_line.split(" | ")[2] == "1.000"  # time over its own
    assert any(line.startswith("| pnode default |") for line in table)
    assert doc["command"] in markdown


def test_implicit(tmp_path):
    run_benchmark("benchmarks.implicit", tmp_path, *IMPLICIT_ARGS)
    doc, markdown = load(tmp_path, "implicit")
    assert [(e["method"], e["steps"]) for e in doc["rows"]] == [("rk4", 4), ("cn", 4)]
    for entry in doc["rows"]:
        check_measured(entry)
        assert entry["result"]["steps"] == 4
    rk4, cn = (entry["result"] for entry in doc["rows"])
    assert rk4["grad_error"] < 1e-5
    assert cn["grad_error"] < 1e-4  # Newton to 1e-4 relative; the reference solves each step to round-off
    assert cn["newton_per_step"] >= 1 and cn["krylov_per_step"] >= cn["newton_per_step"]
    assert cn["solver"]["snes_rtol"] == pytest.approx(1e-4) and cn["solver"]["ksp_rtol"] == pytest.approx(1e-6)
    lines = markdown.splitlines()
    assert any(line.startswith("| cn (pnode snes_rtol=0.0001, ksp_rtol=1e-06) |") for line in lines)
    assert os.path.exists(os.path.join(tmp_path, "implicit-time.png"))


def test_breakdown(tmp_path):
    """Each part is measured where the module says, and none overlaps another: they fit in the step."""
    rows = ("small/rk4-50/torchdiffeq-odeint", "small/rk4-50/pnode:adjoint=graphs")
    stdout = run_benchmark("benchmarks.breakdown", tmp_path, "--rows", *rows)
    with open(os.path.join(tmp_path, "breakdown.json")) as fh:
        doc = json.load(fh)
    assert [entry["id"] for entry in doc["rows"]] == list(rows)
    odeint, pnode = (entry["result"] for entry in doc["rows"])
    for result in (odeint, pnode):
        assert result["f_forward_s"] > 0 and result["backward_s"] > 0
        assert 0 <= result["rest_s"] < result["time_s"]
    assert odeint["petsc_vectors_s"] == 0 and pnode["petsc_vectors_s"] > 0
    assert "| small/rk4-50/pnode:adjoint=graphs |" in stdout


def test_fixed_cost(tmp_path):
    """The per-stage table: every row measured (one round, toy sizes), each pnode row against torchdiffeq's."""
    stdout = run_benchmark("benchmarks.fixed_cost", tmp_path, "--rounds", "1", "--repeats", "1", "--warmup", "1",
                           "--rows", "small/rk4-50/*")
    doc, markdown = load(tmp_path, "fixed_cost")
    rows = {(row["library"], row["mode"]): row for row in doc["rows"]}
    assert set(rows) == {("torchdiffeq", "odeint"), ("pnode", "graphs"), ("pnode", "states")}
    assert all("error" not in row and len(row["times"]) == 1 and row["stages"] == 200 for row in rows.values())
    assert markdown.strip() in stdout
    assert "| small | rk4-50 | pnode | graphs |" in markdown


def test_fixed_cost_paired_times_torchdiffeq_beside_each_pnode_row(tmp_path):
    stdout = run_benchmark("benchmarks.fixed_cost", tmp_path, "--rounds", "2", "--repeats", "2", "--warmup", "1",
                           "--rows", "scale/rk4-50/*", "--paired")
    doc, markdown = load(tmp_path, "fixed_cost")
    rows = {(row["library"], row["mode"]): row for row in doc["rows"]}
    for mode in ("graphs", "states"):  # two rounds of two pairs each
        assert len(rows["pnode", mode]["times"]) == len(rows["pnode", mode]["reference_times"]) == 4
    assert "reference_times" not in rows["torchdiffeq", "odeint"]
    assert "× torchdiffeq, paired |" in markdown and markdown.strip() in stdout
    paired_column = {line.split("|")[3].strip() + ":" + line.split("|")[4].strip(): line.split("|")[-2].strip()
                     for line in markdown.splitlines()[2:]}
    assert paired_column["torchdiffeq:odeint"] == "–"
    assert re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\)", paired_column["pnode:graphs"])


def test_paired_ratio_is_the_median_and_quartiles_of_the_per_pair_ratios():
    from benchmarks.fixed_cost import paired_ratio

    # per-pair ratios 1, 2, 3, 4, 5 (the reference's times move; a ratio of medians would give 6/3 = 2)
    res = {"times": [1.0, 4.0, 9.0, 16.0, 25.0], "reference_times": [1.0, 2.0, 3.0, 4.0, 5.0]}
    assert paired_ratio(res) == "3.00 (2.00–4.00)"  # quartiles within the observed ratios
    assert paired_ratio({"times": [1.0]}) == "–"


def test_vec_traffic_counts_one_step_per_time_step_with_kept_graphs():
    # kept graphs on a small state: the trajectory holds the stages, so the adjoint re-takes no step
    script = os.path.join(ROOT, "scripts", "vec_traffic.py")
    proc = subprocess.run([sys.executable, script, "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: float(line.split()[2]) for line in proc.stdout.splitlines()[1:]}
    assert rows["TSStep"] == 1.0 and rows["TSAdjointStep"] == 1.0, proc.stdout
    assert rows["VecMAXPY"] > 0, proc.stdout


@pytest.mark.parametrize("workload", ["scale", "small"])
def test_floor_s_five_backward_passes_agree_and_its_table_has_both_designs(workload):
    # benchmarks.floor times two discrete RK adjoints written in torch (kept graphs, stored states),
    # backprop, torchdiffeq and pnode's two strategies: every one must give the same gradient
    proc = subprocess.run([sys.executable, "-m", "benchmarks.floor", "--quick", "--steps", "7", "--pairs", "2",
                           "--warmup", "1", "--workload", workload],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("dL/dp[0]:"))
    values = dict(part.split() for part in line[len("dL/dp[0]:"):].split(","))
    assert list(values) == ["backprop", "torch:graphs", "torch:states", "pnode:graphs", "pnode:states"]
    backprop = float(values.pop("backprop"))
    assert backprop != 0.0
    for name, value in values.items():  # pnode sums in PETSc's float64: float32 round-off apart
        assert abs(float(value) - backprop) <= 1e-5 * abs(backprop), (name, line)
    rows = re.findall(r"^\| (kept graphs|stored states) \| (.*) \|$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["kept graphs", "stored states"], proc.stdout
    for _, cells in rows:
        for median, low, high in re.findall(r"(\d+\.\d+) \((\d+\.\d+)–(\d+\.\d+)\)", cells):
            assert float(low) <= float(median) <= float(high)
    assert re.search(r"^one evaluation of f without its graph: \d+ µs; torchdiffeq's training step: \d+ µs per stage$",
                     proc.stdout, re.M), proc.stdout


def _stub_steps(durations):
    """Steps that take ``durations`` (name -> seconds) on a stub clock: (steps, clock, order run)."""
    now, order = [0.0], []

    def stepping(name, duration):
        def step():
            order.append(name)
            now[0] += duration
        return step
    return {name: stepping(name, d) for name, d in durations.items()}, (lambda: now[0]), order


def test_rotations_time_every_step_once_each_starting_one_later():
    from benchmarks.interleaved import rotations

    steps, clock, order = _stub_steps({"a": 1.0, "b": 2.0, "c": 4.0})
    times = rotations(steps, 4, clock=clock)
    assert times == [{"a": 1.0, "b": 2.0, "c": 4.0}] * 4
    assert "".join(order) == "abc" "bca" "cab" "abc"


def test_interleaved_pairs_alternate_their_order_and_divide_this_step_by_the_other():
    from benchmarks.interleaved import paired_ratios, summary

    steps, clock, order = _stub_steps({"this": 3.0, "other": 2.0})
    ratios = paired_ratios(steps["this"], steps["other"], 4, clock=clock)
    assert ratios == [1.5] * 4
    assert order == ["this", "other", "other", "this", "this", "other", "other", "this"]
    assert summary([1.0, 2.0, 3.0, 4.0, 5.0]) == "3.000 (2.000–4.000)"  # quartiles within the ratios
    assert summary([1.0, 2.0, 3.0, 4.0, 5.0], digits=2) == "3.00 (2.00–4.00)"


def test_interleaved_runs_another_checkout_s_pnode_in_the_same_process():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.interleaved", "--other", ROOT, "--rows", "scale/rk4-50/*",
                           "--pairs", "3", "--warmup", "1", "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^\| (scale/rk4-50/\w+) \| (\d+\.\d+) \((\d+\.\d+)–(\d+\.\d+)\) \|$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["scale/rk4-50/graphs", "scale/rk4-50/states"], proc.stdout
    for _, median, low, high in rows:
        assert float(low) <= float(median) <= float(high)


def test_interleaved_loads_the_other_checkout_under_its_own_name(tmp_path):
    code = ("import sys, pnode; from benchmarks.interleaved import load_other; "
            f"other = load_other({ROOT!r}); "
            "assert other is not pnode and other.odeint is not pnode.odeint; "
            "assert sys.modules['pnode_other._impl.solver'].Solver is not sys.modules['pnode._impl.solver'].Solver; "
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    missing = subprocess.run([sys.executable, "-m", "benchmarks.interleaved", "--other", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no pnode/__init__.py there" in missing.stderr


def test_fixed_cost_compare_rows_run_the_other_checkout_s_pnode(tmp_path):
    # `python -m` puts the working folder (this checkout) ahead of PYTHONPATH: a compared row must
    # still import the other checkout's pnode, and a row that did not is reported as an error
    import argparse

    from benchmarks.fixed_cost import Row, run_row

    stub = tmp_path / "other" / "pnode"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(
        "import torch\n"
        "def odeint_adjoint(func, y0, t, **kwargs):\n"
        "    return torch.stack([y0 + 0 * func(t[0], y0)] * len(t))\n")
    args = argparse.Namespace(threads=1, quick=True, warmup=0, repeats=1, paired=False)
    row = Row("scale", "rk4-50", "pnode", "graphs", "other")
    result = run_row(row, {"other": str(tmp_path / "other")}, args)
    assert "error" not in result and len(result["times"]) == 1, result
    assert result["stages"] == 1  # the stub's one call of f, not pnode's 200 stages
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_row(row, {"other": str(empty)}, args)
    assert "not " + str(empty) in result["error"]
