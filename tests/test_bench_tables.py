"""The memory benchmark's tables: ratios per PETSc build, and ``--replot`` reading a table back.

These exercise scripts/bench_memory.py's bookkeeping on made-up rows (no solves run).
"""

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "scripts"))
import bench_memory as bm  # noqa: E402


def _result(time_s, peak_mb, **extra):
    grad_err = extra.pop("grad_err", 1e-7)  # as bench_memory measures it: both errors, or neither (None)
    return {"time_s": time_s, "peak_mb": peak_mb, "held_mb": 1.0, "hwm_reset": True, "nfe_f": 64, "nfe_b": 64,
            "nfe_recompute": 0, "grad_err": grad_err, "grad_err_plain": grad_err, **extra}


ROWS = [
    (bm.Config("pnode", "rk4", 16), _result(1.10, 300.0)),
    (bm.Config("pnode", "rk4", 16, petsc="single"), _result(1.30, 150.0)),
    (bm.Config("pnode-K", "rk4", 16), _result(1.40, 200.0)),
    (bm.Config("pnode-K-lean", "rk4", 16, stage_graphs=2), _result(1.60, 170.0)),
    (bm.Config("pnode-K-lean", "rk4", 16, stage_graphs=2, petsc="single"), _result(1.50, 120.0)),
    (bm.Config("pnode", "dopri5", None), _result(0.40, 250.0, steps_taken=3)),
    (bm.Config("odeint", "rk4", 16), _result(0.80, 1600.0)),
    (bm.Config("odeint_adjoint", "rk4", 16), _result(1.00, 100.0)),
    (bm.Config("odeint_adjoint", "dopri5", None), _result(0.60, 200.0, steps_tried=4)),
]


def test_replot_reads_back_what_the_results_table_wrote(tmp_path):
    table = tmp_path / "table.md"
    later = bm.results_table([(bm.Config("pnode", "rk4", 64), _result(9.0, 900.0))])
    table.write_text("prose | with | bars that is not a row\n" + bm.results_table(ROWS) + "\n\ntext\n\n" + later + "\n")
    back = bm.rows_from_markdown(str(table))
    want = {(c.family, c.method, c.steps, c.petsc, c.stage_graphs): (r["time_s"], r["peak_mb"]) for c, r in ROWS}
    got = {(c.family, c.method, c.steps, c.petsc, c.stage_graphs): (r["time_s"], r["peak_mb"]) for c, r in back}
    assert got == want  # the first table only: the later one is not read
    adaptive = {c.family: r for c, r in back if c.steps is None}
    assert adaptive["pnode"]["steps_taken"] == 3 and adaptive["odeint_adjoint"]["steps_tried"] == 4


def test_acceptance_ratios_are_computed_per_petsc_build():
    args = bm.parse_args(["--methods", "rk4,dopri5", "--steps", "16", "--checkpoint-methods", "rk4"])
    checks = {name: value for name, value, _ in bm.acceptance_rows(ROWS, args, None)}
    default = "rk4, 16 steps: time pnode (store all) / torchdiffeq odeint_adjoint ≤ 1.05"
    single = "rk4, 16 steps: time pnode (store all, float32 PETSc) / torchdiffeq odeint_adjoint ≤ 1.05"
    assert checks[default] == "1.10" and checks[single] == "1.30"
    lean = ("rk4, 16 steps: peak memory pnode (K=4, last 2 stage graphs kept, float32 PETSc) / "
            "torchdiffeq odeint_adjoint ≤ 1.5")
    assert checks[lean] == "1.20"


def test_lean_rows_run_at_the_asked_step_counts_and_get_a_time_ratio_at_each():
    args = bm.parse_args(["--methods", "rk4", "--steps", "16,64", "--only", "pnode", "--lean-rows", "0,2",
                          "--lean-steps", "16,64", "--no-grad-check"])
    lean = {(c.steps, c.stage_graphs) for c in bm.configurations(args) if c.family == "pnode-K-lean"}
    assert lean == {(16, 0), (16, 2), (64, 0), (64, 2)}
    rows = ROWS + [(bm.Config("pnode", "rk4", 64), _result(4.0, 900.0)),
                   (bm.Config("pnode-K-lean", "rk4", 64, stage_graphs=2), _result(6.4, 175.0))]
    checks = {name: value for name, value, _ in bm.acceptance_rows(rows, args, None)}
    assert checks["rk4, 64 steps: time pnode (K=4, last 2 stage graphs kept) / pnode (store all) ≤ 1.5"] == "1.60"
    assert checks["rk4, 16 steps: time pnode (K=4, last 2 stage graphs kept) / pnode (store all) ≤ 1.5"] == "1.45"
    assert not any("64 steps: peak memory" in name for name in checks)  # the memory target is at 16 steps


def test_a_run_of_some_rows_reports_only_their_ratios_and_a_failed_row_as_not_measured():
    args = bm.parse_args(["--methods", "rk4", "--steps", "16", "--checkpoints", "0", "--no-lean-rows",
                          "--no-grad-check"])
    rows = [(c, r) for c, r in ROWS if c.family in ("pnode", "odeint", "odeint_adjoint") and c.method == "rk4"]
    checks = {name: (value, mark) for name, value, mark in bm.acceptance_rows(rows, args, None)}
    assert checks == {
        "rk4, 16 steps: time pnode (store all) / torchdiffeq odeint_adjoint ≤ 1.05": ("1.10", "✗"),
        "rk4, 16 steps: peak memory pnode (store all) / torchdiffeq odeint ≤ 0.35": ("0.19", "✓"),
        "rk4, 16 steps: time pnode (store all, float32 PETSc) / torchdiffeq odeint_adjoint ≤ 1.05": ("1.30", "✗"),
        "rk4, 16 steps: peak memory pnode (store all, float32 PETSc) / torchdiffeq odeint ≤ 0.35": ("0.09", "✓")}
    failed = [(c, {"error": "killed"} if c.family == "odeint" else r) for c, r in rows]
    checks = {name: value for name, value, _ in bm.acceptance_rows(failed, args, None)}
    assert checks["rk4, 16 steps: peak memory pnode (store all) / torchdiffeq odeint ≤ 0.35"] == "not measured"


@pytest.mark.parametrize("value,bound,shown,mark", [(1.504, 1.5, "1.504", "✗"), (1.2, 1.5, "1.20", "✓")])
def test_a_ratio_next_to_its_bound_is_not_rounded_onto_it(value, bound, shown, mark):
    _, text, got_mark = bm.ratio_check("x", {"t": value}, {"t": 1.0}, "t", bound)
    assert (text, got_mark) == (shown, mark)


def test_page_faults_are_the_last_column_and_missing_ones_show_a_dash():
    table = bm.results_table([(bm.Config("pnode", "rk4", 16), _result(1.0, 100.0, faults=61244)),
                              (bm.Config("odeint", "rk4", 16), _result(0.8, 900.0))]).splitlines()
    assert table[0].endswith("| grad rel. error | grad rel. error vs float32 autograd | page faults / step |")
    cells = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in table[2:]}
    assert cells == {"pnode (store all)": "61,244", "torchdiffeq odeint": "-"}


def test_the_gradient_target_is_checked_in_each_row_s_own_arithmetic_and_float32_autograd_is_shown_beside():
    rows = [(bm.Config("pnode", "rk4", 16), _result(1.0, 100.0, grad_err=2e-7, grad_err_plain=3e-5)),
            (bm.Config("pnode", "rk4", 16, petsc="single"), _result(1.0, 90.0, grad_err=4e-7)),
            (bm.Config("odeint_adjoint", "rk4", 16), _result(1.0, 90.0, grad_err=4e-3)),
            (bm.Config("odeint", "rk4", 16), _result(0.8, 900.0, grad_err=None))]
    checks = {name: (value, mark) for name, value, mark in bm.gradient_checks(rows)}
    assert checks == {
        "gradient error of every pnode row (float32; autograd in the row's arithmetic) ≤ 1e-5":
            ("max 4.0e-07: pnode (store all, float32 PETSc) rk4 (16 steps, cpu)", "✓"),
        "gradient error of pnode against float32 autograd (for comparison)":
            ("max 3.0e-05: pnode (store all) rk4 (16 steps, cpu)", ""),
        "gradient error of torchdiffeq odeint_adjoint (for comparison)":
            ("max 4.0e-03: torchdiffeq odeint_adjoint rk4 (16 steps, cpu)", "")}
    cells = [line.split("|")[9:11] for line in bm.results_table(rows).splitlines()[2:]]
    assert [[c.strip() for c in pair] for pair in cells] == [
        ["2.0e-07", "3.0e-05"], ["4.0e-07", "4.0e-07"], ["ref", "ref"], ["4.0e-03", "4.0e-03"]]


def test_rounds_give_the_median_of_time_memory_and_faults_and_a_single_round_stays():
    result = {"time_s": 1.0, "peak_mb": 160.0, "held_mb": 80.0, "faults": 10,
              "rounds_time_s": [1.0, 1.3, 1.1], "rounds_peak_mb": [160.0, 150.0, 171.0],
              "rounds_held_mb": [80.0, 80.0, 79.0], "rounds_faults": [10, 30, 20]}
    bm.combine_rounds(result)
    assert (result["time_s"], result["peak_mb"], result["held_mb"], result["faults"]) == (1.1, 160.0, 80.0, 20)
    alone = {"time_s": 2.0, "peak_mb": 100.0, "held_mb": 5.0, "faults": 3}
    bm.combine_rounds(alone)
    assert alone == {"time_s": 2.0, "peak_mb": 100.0, "held_mb": 5.0, "faults": 3}


def test_memory_is_the_median_of_the_measured_steps_and_a_failed_reset_shows():
    samples = [{"peak_mb": p, "held_mb": 10.0, "step_peak_mb": p - 10.0, "host_peak_mb": p, "hwm_reset": ok}
               for p, ok in ((120.0, True), (112.0, True), (131.0, False))]
    got = bm.median_memory(samples)
    assert (got["peak_mb"], got["step_peak_mb"], got["held_mb"], got["hwm_reset"]) == (120.0, 110.0, 10.0, False)


def test_grad_precision_measures_at_the_weights_after_the_asked_training_steps(tmp_path):
    import bench_grad_precision as bgp

    out = tmp_path / "prec.md"
    bgp.main(["--methods", "rk4", "--steps", "2", "--batch", "4", "--channels", "8", "--size", "4",
              "--train-steps", "2,0", "--threads", "1", "--markdown", str(out)])
    table = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| rk4")]
    assert [cells[-1].strip() for cells in table] == ["0", "2"]
    errors = [float(c) for cells in table for c in cells[2:6]]
    assert max(errors) < 1e-5  # a small, well-conditioned block: float32 round-off only


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_pnode_float32_gradients_equal_autograd_in_pnode_s_own_arithmetic(method, tmp_path):
    """The ODE-Net block (ReLU, GroupNorm) in float32, after some training: autograd through the same
    steps done as pnode does them (on the default build: float64 sums, network in float32) gives
    pnode's gradient to the round-off of float32 VJPs."""
    import bench_grad_precision as bgp

    out = tmp_path / "prec.md"
    bgp.main(["--methods", method, "--steps", "8", "--batch", "8", "--channels", "16", "--size", "6",
              "--train-steps", "3", "--threads", "1", "--markdown", str(out)])
    (cells,) = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith(f"| {method}")]
    assert float(cells[2]) < 2e-6


@pytest.mark.parametrize("argv,message", [(["--train-steps", "-1"], "--train-steps must be at least 0"),
                                          (["--methods", "rk4,rk5"], r"unknown methods \['rk5'\]")])
def test_grad_precision_refuses_bad_arguments(argv, message, capsys):
    import bench_grad_precision as bgp

    with pytest.raises(SystemExit):
        bgp.main(argv)
    assert re.search(message, capsys.readouterr().err)
