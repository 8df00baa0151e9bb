"""pnode's own checkpointing (``options={'checkpoints': K}``): same gradients, bounded memory.

A checkpointed run re-takes the forward steps with the recorded step sizes, so it must give the
store-everything gradients to round-off (1e-12 relative) for explicit, implicit and adaptive
methods; the schedule is checked against a brute-force optimum and the memory bound by counting
the states held.
"""

from functools import lru_cache

import pytest
import torch
from conftest import CheckpointSpy, rel_err, skip_if_zero_weight_broken
from problems import ConvField, MLPField

import pnode
from pnode._compat import PETSc
from pnode._impl import checkpoint
from pnode._impl.odeint import odeint_adjoint_reported
from pnode.testing.references import TABLEAUS, rk_solve

T3 = torch.tensor([0.0, 0.35, 1.0], dtype=torch.float64)

CASES = [  # method, options; fixed, adaptive and implicit, with steps that do not divide the outputs
    ("euler", {"step_size": 0.05}),
    ("rk4", {"step_size": 0.04}),
    ("dopri5", {}),
    ("bosh3", {}),
    ("tsit5", {}),  # a tableau pnode registers with PETSc, first-same-as-last like dopri5
    ("heun3", {"step_size": 0.05}),
    ("cn", {"step_size": 0.05, "ksp_rtol": 1e-14, "snes_rtol": 1e-14}),
    ("beuler", {"step_size": 0.05, "ksp_rtol": 1e-14, "snes_rtol": 1e-14}),
]


def gradients(method, options, t=T3, seed=1):
    torch.manual_seed(seed)
    func = MLPField().double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint_adjoint(func, y0, t, method=method, options=options, rtol=1e-6, atol=1e-8)
    weights = torch.randn(ys.shape, dtype=torch.float64)
    grads = torch.autograd.grad((ys * weights).sum(), (y0, *func.parameters()))
    return ys.detach(), grads


@pytest.mark.parametrize("checkpoints", [1, 2, 4])
@pytest.mark.parametrize("method,options", CASES, ids=[c[0] for c in CASES])
def test_checkpointed_gradients_equal_store_everything(method, options, checkpoints):
    skip_if_zero_weight_broken(method)
    ys, want = gradients(method, options)
    ys_ck, got = gradients(method, {**options, "checkpoints": checkpoints})
    assert torch.equal(ys, ys_ck)  # the forward pass is the same solve
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("method,options", CASES, ids=[c[0] for c in CASES])
def test_checkpointed_gradients_without_kept_stage_graphs_equal_store_everything(method, options):
    skip_if_zero_weight_broken(method)
    _, want = gradients(method, options)
    _, got = gradients(method, {**options, "checkpoints": 2, "checkpoint_graphs": False})
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12


def test_checkpointed_rk4_matches_backprop_through_the_same_steps():
    torch.manual_seed(3)
    func = ConvField().double()
    x0 = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ys = pnode.odeint_adjoint(func, x0, t, method="rk4", options={"step_size": 1 / 16, "checkpoints": 3})
    ref = rk_solve(func, x0, t.tolist(), 1 / 16, TABLEAUS["rk4"])
    got = torch.autograd.grad(ys[-1].square().sum(), (x0, *func.parameters()))
    want = torch.autograd.grad(ref[-1].square().sum(), (x0, *func.parameters()))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12


def test_decreasing_times_and_time_gradients_with_checkpoints():
    t = torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64, requires_grad=True)
    results = []
    for opts in ({"step_size": 0.05}, {"step_size": 0.05, "checkpoints": 2}):
        torch.manual_seed(2)
        func = MLPField().double()
        y0 = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
        ys = pnode.odeint_adjoint(func, y0, t, method="rk4", options=opts)
        results.append(torch.autograd.grad(ys.sum(), (y0, t, *func.parameters())))
    for g, w in zip(*results):
        assert rel_err(g, w) < 1e-12


@lru_cache(maxsize=None)
def brute_force_cost(m: int, slots: int) -> int:
    """Fewest advanced steps to reverse m steps with the start state and `slots` more, by exhaustive DP."""
    if m <= 1:
        return 0
    if slots == 0:
        return m * (m - 1) // 2
    return min(j + brute_force_cost(m - j, slots - 1) + brute_force_cost(j, slots) for j in range(1, m))


@pytest.mark.parametrize("slots", [0, 1, 2, 3, 5])
def test_binomial_closed_form_is_the_optimum(slots):
    for m in range(1, 60):
        assert checkpoint.recomputed_steps(m, slots) == brute_force_cost(m, slots), (m, slots)


def test_store_keeps_at_most_capacity_states_evenly_spread():
    for capacity in (1, 3, 7):
        for steps in (5, 16, 63, 200):
            store = checkpoint.CheckpointStore(capacity)
            for step in range(1, steps):
                store.offer(step, torch.full((2,), float(step)))
                assert len(store.states) <= capacity
            kept = sorted(store.states)
            assert all(float(store.states[k][0]) == k for k in kept)
            assert all(k % store.stride == 0 for k in kept)
            # evenly spread: no gap between kept states (or the ends) longer than twice the stride
            gaps = [b - a for a, b in zip([0] + kept, kept + [steps])]
            assert max(gaps) <= 2 * store.stride


@pytest.mark.parametrize("checkpoints", [1, 2, 4, 8])
def test_memory_stays_within_the_budget_and_each_step_is_reversed_once(monkeypatch, checkpoints):
    spy = CheckpointSpy(monkeypatch)
    steps = 64
    func = MLPField().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                              options={"step_size": 1 / steps, "checkpoints": checkpoints})
    ys[-1].sum().backward()
    (adjoint,) = spy.runs
    assert adjoint.peak_stored <= checkpoints
    assert adjoint.recorded_steps == steps
    # far fewer recomputations than the quadratic cost of keeping nothing
    assert adjoint.advanced_steps <= (steps * (steps - 1)) // 2
    if checkpoints >= 4:
        assert adjoint.advanced_steps <= 3 * steps


def test_checkpointed_rk4_re_evaluates_nothing_beyond_store_everything():
    counts = []
    for opts in ({"step_size": 0.125}, {"step_size": 0.125, "checkpoints": 8}):
        block = pnode.ODEBlock(MLPField().double(), method="rk4", options=opts)
        block(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
        counts.append((block.nfe_forward, block.counter.backward, block.counter.vjp))
    store_all, checkpointed = counts
    # 8 slots for 8 steps: nothing to recompute; the re-taken steps' graphs serve the adjoint
    assert checkpointed == store_all


def test_checkpointed_dopri5_builds_no_graph_beyond_store_everything():
    """dopri5 is FSAL: its last stage only hands its derivative to the next step, and PETSc's adjoint
    never linearises it. A re-taken step evaluates it without a graph (once per step, beyond
    store-all's evaluations) and starts from the kept derivative instead of evaluating its first."""
    skip_if_zero_weight_broken("dopri5")
    counts = []
    for opts in ({}, {"checkpoints": 64}):
        counter = pnode._impl.rhs.EvaluationCounter()
        torch.manual_seed(4)
        func = MLPField().double()
        ys = odeint_adjoint_reported(func, torch.randn(2, 3, dtype=torch.float64), torch.tensor([0.0, 1.0]).double(),
                                  method="dopri5", rtol=1e-6, atol=1e-8, options=opts, counter=counter)
        torch.autograd.grad(ys[-1].sum(), tuple(func.parameters()))
        counts.append(counter)
    store_all, checkpointed = counts
    steps = (store_all.forward - 2 - 7) // 6 + 1  # two pick the first step, 7 for it, 6 per later step
    assert steps >= 4
    # 64 slots: nothing recomputed; one graph per stage the adjoint linearises, as store-all builds
    assert (checkpointed.backward, checkpointed.vjp) == (store_all.backward, store_all.vjp) == (6 * steps,) * 2
    assert checkpointed.forward == store_all.forward + steps


@pytest.mark.parametrize("via", ["options", "command line"])
@pytest.mark.parametrize("graphs", [False, 2])
def test_dropping_stage_graphs_costs_one_evaluation_per_dropped_stage_and_keeps_the_gradients(graphs, via):
    torch.manual_seed(3)
    func = MLPField().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    results = []
    for opts in ({"step_size": 0.125}, {"step_size": 0.125, "checkpoints": 8}, {"step_size": 0.125, "checkpoints": 8}):
        if len(results) == 2:
            if via == "options":
                opts["checkpoint_graphs"] = graphs
            else:
                set_option("pnode_checkpoint_graphs", "no" if graphs is False else str(graphs))
        counter = pnode._impl.rhs.EvaluationCounter()
        try:
            ys = odeint_adjoint_reported(func, y0, t, method="rk4", options=opts, counter=counter)
            grads = torch.autograd.grad(ys.sum(), (y0, *func.parameters()))
        finally:
            PETSc.Options().delValue("pnode_checkpoint_graphs")
        results.append((counter.forward, counter.backward, grads))
    (f_all, b_all, g_all), (f_keep, b_keep, g_keep), (f_drop, b_drop, g_drop) = results
    assert (f_keep, b_keep) == (f_all, b_all)  # kept graphs: no evaluation beyond store-all
    if graphs is False:
        assert (f_drop, b_drop) == (f_all + 32, b_all)  # 8 steps x 4 stages evaluated again
    else:
        # the re-take builds all 4 stage graphs, keeps the last 2: 8 steps x 2 stages linearised again
        assert (f_drop, b_drop) == (f_all, b_all + 16)
    for a, b in zip(g_drop, g_all):
        assert rel_err(a, b) < 1e-12


def test_kept_stage_graphs_are_the_last_ones_and_at_most_the_limit():
    torch.manual_seed(3)
    # a state size no other test uses: the solver is built here, after the watch is in place
    func = MLPField(dim=7).double()
    y0 = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    held = []
    original = pnode._impl.evaluation.Evaluator.evaluate

    def watch(self, ts, tau, u, f):
        original(self, ts, tau, u, f)
        if self.graphs is not None:
            held.append([lin.tau for lin in self.graphs.graphs])

    pnode._impl.evaluation.Evaluator.evaluate = watch
    try:
        ys = pnode.odeint_adjoint(func, y0, torch.tensor([0.0, 0.25], dtype=torch.float64), method="rk4",
                                  options={"step_size": 0.125, "checkpoints": 1, "checkpoint_graphs": 3})
        ys.sum().backward()
    finally:
        pnode._impl.evaluation.Evaluator.evaluate = original
    assert max(len(h) for h in held) == 3
    # after a re-taken rk4 step from tau: the stages at tau + h/2, tau + h/2 and tau + h
    last = held[-1]
    assert last[0] == pytest.approx(last[1]) and last[2] == pytest.approx(last[0] + 0.0625)


@pytest.mark.parametrize("value", ["sometimes", -1, 1.5])
def test_bad_checkpoint_graphs_value_is_reported(value):
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(pnode.InputError, match="checkpoint_graphs.*true.*false.*number of stage graphs"):
        pnode.odeint_adjoint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                             options={"checkpoints": 2, "checkpoint_graphs": value})


def set_option(name, value):
    PETSc.Options().setValue(name, value)


def test_command_line_sets_checkpoints_and_prefix_overrides(monkeypatch):
    spy = CheckpointSpy(monkeypatch)
    func = MLPField().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    db = PETSc.Options()
    try:
        set_option("pnode_checkpoints", "3")
        pnode.odeint_adjoint(func, y0, t, method="rk4", options={"step_size": 0.1})[-1].sum().backward()
        assert spy.runs[-1].checkpoints == 3
        set_option("blk_ck_pnode_checkpoints", "2")
        block = pnode.ODEBlock(func, method="rk4", options={"step_size": 0.1, "checkpoints": 5}, prefix="blk_ck_")
        block(y0).sum().backward()
        assert spy.runs[-1].checkpoints == 2
        set_option("blk_ck_pnode_checkpoints", "0")  # 0: store every step
        n_runs = len(spy.runs)
        block(y0).sum().backward()
        assert len(spy.runs) == n_runs
    finally:
        for name in ("pnode_checkpoints", "blk_ck_pnode_checkpoints"):
            db.delValue(name)


@pytest.mark.parametrize("value", [-1, 2.5, "many"])
def test_bad_checkpoint_budget_is_reported(value):
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(pnode.InputError, match="checkpoints"):
        pnode.odeint_adjoint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                             method="rk4", options={"checkpoints": value})


def test_disk_trajectory_gives_the_same_gradients(tmp_path):
    directory = tmp_path / "trajectory"
    _, want = gradients("rk4", {"step_size": 0.1})
    _, got = gradients("rk4", {"step_size": 0.1, "ts_trajectory_type": "basic",
                               "ts_trajectory_dirname": str(directory), "ts_trajectory_keep_files": True})
    assert any(directory.iterdir())  # the steps went to disk (and stay: PETSc deletes them with the trajectory)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-13


def test_petsc_limited_memory_trajectory_needs_revolve_or_says_what_to_use():
    from pnode._compat import has_revolve

    if has_revolve():
        pytest.skip("this PETSc has Revolve: -ts_trajectory_max_cps_ram works as PETSc documents")
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(pnode.InputError, match="Revolve.*checkpoints"):
        pnode.odeint_adjoint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                             options={"step_size": 0.1, "ts_trajectory_max_cps_ram": 3})


def test_store_everything_after_checkpointing_reuses_the_recorder_safely():
    # The checkpoint recorder (one-step solves) and store-everything solves share pooled solvers;
    # a store-everything solve on a TS first set up for one step used to crash PETSc.
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)  # binary-exact step times, as in the reference
    h = 1 / 16
    for options in ({"step_size": h, "checkpoints": 2}, {"step_size": h}, {"step_size": h, "checkpoints": 4}):
        func = MLPField().double()
        y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        ys = pnode.odeint_adjoint(func, y0, t, method="rk4", options=options)
        ref = rk_solve(func, y0, t.tolist(), h, TABLEAUS["rk4"])
        w = torch.randn_like(ref)
        got = torch.autograd.grad((ys * w).sum(), (y0, *func.parameters()))
        want = torch.autograd.grad((ref * w).sum(), (y0, *func.parameters()))
        for g, r in zip(got, want):
            assert rel_err(g, r) < 1e-10
