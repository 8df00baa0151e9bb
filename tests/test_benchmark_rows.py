"""Benchmark bookkeeping without a run: the memory-budget table from result entries, and rounds merged."""

import pytest

from benchmarks import cli
from benchmarks.measure import merge_round
from benchmarks.report import budget_table, one_step_graphs

MIB = 2**20


def _entry(budget, time_s, peak_mb, adjoint, f=256):
    return {"options": {"memory_budget": budget}, "library": "pnode", "steps": 64,
            "result": {"time_s": time_s, "peak_mb": peak_mb, "adjoint": adjoint, "grad_error": 2e-7,
                       "evaluations": {"forward": {"f": f, "jvp": 0}, "backward": {"graphs": 256 - f // 2, "f": 0}}}}


def _stats(strategy, graphs=0, graph_mb=0, states=64, stage_states=0, stored_mb=0, k=None):
    return {"strategy": strategy, "steps": 64, "graphs_kept": graphs, "graph_bytes": graph_mb * MIB,
            "states_stored": states, "stage_states": stage_states, "stored_bytes": stored_mb * MIB,
            "checkpoints": k, "recomputed_steps": 0, "budget_bytes": None, "solver_bytes": 70 * MIB}


def test_budget_rows_say_what_was_chosen_what_it_held_and_the_peak_over_the_budget():
    entries = [_entry("200MiB", 8.0, 216.0, _stats("checkpoints", states=25, stored_mb=100, k=25)),
               _entry("2843MiB", 6.0, 2508.0, _stats("graphs", 90, 1480, stage_states=256, stored_mb=1280)),
               _entry("5514MiB", 4.0, 4443.0, _stats("graphs", 256, 4209, stored_mb=256))]
    rows = [line.split(" | ") for line in budget_table(entries).splitlines()[2:]]
    assert [row[1] for row in rows] == ["K = 25 checkpoints", "90 graphs, 64 states with stages", "all 256 graphs"]
    assert [row[2] for row in rows] == ["170.0", "2830.0", "4535.0"]  # graphs + states + solver vectors
    assert [row[4] for row in rows] == ["+16.0", "-335.0", "-1071.0"]
    assert [row[6] for row in rows] == ["–", "0.750", "0.667"]  # time over the previous budget's


def test_one_step_transient_is_one_step_of_measured_stage_graphs():
    entries = [_entry("200MiB", 8.0, 216.0, _stats("checkpoints", states=25, stored_mb=100, k=25)),
               _entry("5514MiB", 4.0, 4443.0, _stats("graphs", 256, 4096, stored_mb=256))]
    assert one_step_graphs(entries) == 4096 / 256 * 4  # 4 stages (256 evaluations in 64 steps)
    assert one_step_graphs(entries[:1]) is None


def test_later_rounds_add_their_times_and_the_median_is_taken_over_all():
    first = {"time_s": 2.0, "times_s": [1.0, 2.0, 9.0], "peak_mb": 5.0}
    merged = merge_round(merge_round(first, {"time_s": 3.0, "times_s": [3.0, 3.5]}), {"error": "timed out"})
    assert merged["times_s"] == [1.0, 2.0, 9.0, 3.0, 3.5] and merged["time_s"] == 3.0 and merged["rounds"] == 2
    assert merged["peak_mb"] == 5.0 and merged["round_errors"] == ["timed out"]


def test_fewer_than_one_round_is_refused():
    args = cli.new_parser("test").parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit, match="--rounds must be at least 1, got 0"):
        cli.settings_from(args)
