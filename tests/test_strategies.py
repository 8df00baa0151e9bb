"""Adjoint strategies: kept graphs, stored states, binomial checkpoints and a memory budget give the
same gradients (bit for bit where the arithmetic is the same), against autograd through the same
steps; their choices and bookkeeping against stubs; the bounded solver pool."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import rel_err, skip_if_zero_weight_broken
from problems import LinearField, MLPField, stable_matrix

import pnode
from pnode._impl import pool
from pnode._impl.budget import MeasuredCosts, MemoryBudget, parse_bytes
from pnode._impl.evaluation import Evaluator, GraphStore
from pnode._impl.odeint import odeint_adjoint_reported
from pnode._impl.stats import SolveStats
from pnode._impl.strategies import BinomialCheckpoints, KeptGraphs
from pnode.testing.references import TABLEAUS, rk_solve

STRATEGIES = [{"adjoint": "states"}, {"adjoint": "graphs"}, {"checkpoints": 3}, {"memory_budget": "1GB"},
              {"memory_budget": 3000}]


def _gradients(method, options, t=(0.0, 0.3, 1.0), rtol=1e-6, atol=1e-8, seed=0):
    torch.manual_seed(seed)
    func = MLPField(dim=5).double()
    y0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    stats = SolveStats()
    ys = odeint_adjoint_reported(func, y0, torch.tensor(t, dtype=torch.float64), method=method, rtol=rtol, atol=atol,
                              options=options, stats=stats)
    weights = torch.linspace(-1, 1, ys.numel(), dtype=torch.float64).reshape(ys.shape)
    return ys, torch.autograd.grad((ys * weights).sum(), (y0, *func.parameters())), stats


@pytest.mark.parametrize("method,fixed", [("euler", {"step_size": 0.1}), ("rk4", {"step_size": 0.1}),
                                          ("midpoint", {"step_size": 0.1}), ("adaptive_heun", {}), ("bosh3", {}),
                                          ("rk4", {"step_size": 0.3}), ("cn", {"step_size": 0.2}),
                                          ("beuler", {"step_size": 0.2})])
def test_every_strategy_gives_the_same_gradient_bit_for_bit(method, fixed):
    skip_if_zero_weight_broken(method)
    reference = None
    for options in STRATEGIES:
        ys, grads, _ = _gradients(method, {**fixed, **options})
        if reference is None:
            reference = (ys, grads)
            continue
        assert torch.equal(ys, reference[0])
        implicit = method in ("cn", "beuler")  # Newton solves re-taken by checkpoints agree to their tolerance
        for got, want in zip(grads, reference[1]):
            assert torch.equal(got, want) if not implicit else rel_err(got, want) < 1e-7, options


def test_fsal_strategies_agree_to_round_off():
    """dopri5 reuses a step's last stage as the next step's first: kept graphs linearise it where it was
    evaluated (the last stage's state), stored states at the stored solution; the two are the same point
    up to round-off in the sums that form them."""
    skip_if_zero_weight_broken("dopri5")
    _, states, _ = _gradients("dopri5", {"adjoint": "states"})
    for options in STRATEGIES[1:]:
        _, grads, _ = _gradients("dopri5", options)
        for got, want in zip(grads, states):
            assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("method", ["euler", "rk4", "bosh3"])
def test_kept_graphs_equal_autograd_through_the_same_steps_and_evaluate_nothing_twice(method):
    ys, grads, stats = _gradients(method, {"step_size": 0.1, "adjoint": "graphs"})
    torch.manual_seed(0)
    func = MLPField(dim=5).double()
    y0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ref = rk_solve(func, y0, [0.0, 0.3, 1.0], 0.1, TABLEAUS[method])
    weights = torch.linspace(-1, 1, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    want = torch.autograd.grad((ref * weights).sum(), (y0, *func.parameters()))
    assert rel_err(ys, ref) < 1e-13
    for got, w in zip(grads, want):
        assert rel_err(got, w) < 1e-12
    a = stats.adjoint
    assert a.strategy == "graphs" and a.graphs_kept == stats.counter.forward  # every evaluation kept its graph
    stages = len(TABLEAUS[method][0]) - (method == "bosh3")  # FSAL: one stage reused from the step before
    assert a.graphs_kept == a.steps * stages + (method == "bosh3")
    assert stats.counter.backward == 0  # no evaluation of f in the backward pass
    assert stats.adjoint.graph_bytes > 0


def test_implicit_methods_keep_states_when_graphs_are_asked_for():
    _, _, stats = _gradients("cn", {"step_size": 0.2, "adjoint": "graphs"})
    assert stats.adjoint.strategy == "states" and stats.adjoint.graphs_kept == 0


def test_a_memory_budget_buys_speed_monotonically():
    """From a budget below the solver's own vectors to one above every graph: checkpoints, then fewer
    and fewer re-evaluated stages, then none; what is held, the solver's vectors included, stays
    within the budget."""
    evaluations, chosen = [], []
    for budget in (2000, 6000, 9000, 20000, 200000):
        for _ in range(2):  # the second call uses the costs the first measured
            _, _, stats = _gradients("rk4", {"step_size": 0.05, "memory_budget": budget})
        a = stats.adjoint
        chosen.append(a.strategy)
        evaluations.append(stats.counter.forward + stats.counter.backward)
        assert a.budget_bytes == budget and a.solver_bytes > 0
        if budget > a.solver_bytes:  # the solver's own vectors count: graphs and states get the rest
            assert a.held_bytes + a.solver_bytes <= budget
        else:  # below what the solver needs anyway: the least pnode can hold
            assert a.strategy == "checkpoints" and a.checkpoints == 1
    assert chosen[0] == "checkpoints" and chosen[-1] == "graphs"
    assert all(b <= a for a, b in zip(evaluations, evaluations[1:])) and evaluations[-1] < evaluations[0]


def _stub(steps, state_bytes, adaptive=False):
    solver = SimpleNamespace(solution=SimpleNamespace(getLocalSize=lambda: state_bytes // 8,
                                                      getArray=lambda readonly: np.zeros(1)), held_bytes=0)
    method = SimpleNamespace(rk_type="4", stages=4, adaptive=adaptive)
    config = SimpleNamespace(method=method, adaptive=adaptive, step_size=None if adaptive else 1.0 / steps)
    problem = SimpleNamespace(config=config, taus=np.array([0.0, 1.0]))
    return solver, problem


def test_budget_choice_against_stubs():
    solver, problem = _stub(10, 800)
    costs = MeasuredCosts(graph_bytes_per_step=5000, stages=4, steps=10)
    assert isinstance(MemoryBudget(10 * (800 + 5000)).choose(solver, problem, costs), KeptGraphs)
    assert MemoryBudget(10 * (800 + 5000)).choose(solver, problem, costs).graph_bytes is None  # all graphs
    partial = MemoryBudget(10 * 5 * 800 + 7000).choose(solver, problem, costs)
    assert isinstance(partial, KeptGraphs) and partial.graph_bytes == 7000
    assert partial.graph_steps == 1  # one step's graphs (5000 bytes) fit: the earlier steps build none
    # checkpoints leave room for reversing one step: its state and 4 stages, and its 4 stage graphs
    reversal = 5 * 800 + 5000
    checkpointed = MemoryBudget(3 * 800 + reversal).choose(solver, problem, costs)
    assert isinstance(checkpointed, BinomialCheckpoints) and checkpointed.checkpoints == 3
    one_graph = MemoryBudget(3 * 800 + 5 * 800 + 1250, checkpoint_graphs=1).choose(solver, problem, costs)
    assert one_graph.checkpoints == 3
    assert MemoryBudget(reversal).choose(solver, problem, costs).checkpoints == 1  # the least pnode can hold
    # first call: no measurement, states and the graphs that fit
    first = MemoryBudget(10 * 5 * 800 + 100).choose(solver, problem, None)
    assert isinstance(first, KeptGraphs) and first.graph_bytes == 100


@pytest.mark.parametrize("text,value", [("2GB", 2 * 10**9), ("512 MiB", 512 * 2**20), ("1.5e3", 1500), (4096, 4096)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["lots", -5, "3 parsecs", True])
def test_bad_budget_is_reported(bad):
    with pytest.raises(pnode.InputError, match="memory_budget.*positive size"):
        _gradients("rk4", {"step_size": 0.1, "memory_budget": bad})


def test_conflicting_strategy_options_are_reported():
    with pytest.raises(pnode.InputError, match="give one of them"):
        _gradients("rk4", {"step_size": 0.1, "adjoint": "graphs", "checkpoints": 4})
    with pytest.raises(pnode.InputError, match="'graphs'.*'states'"):
        _gradients("rk4", {"step_size": 0.1, "adjoint": "backprop"})


class _Lin:
    def __init__(self, tau, u, nbytes=10):
        self.tau, self.u, self.key, self.graph_bytes, self.value = tau, u, None, nbytes, u * 2


class _RHS:
    layout = SimpleNamespace(dtype=torch.float64)

    @staticmethod
    def to_user(u):
        return u

    @staticmethod
    def matches(lin, tau, u, key):
        return False


def test_graph_store_limits_and_finds_the_nearest_stage_against_stubs():
    store = GraphStore(limit=3)
    for i in range(5):
        store.make_room()
        store.add(_Lin(0.1 * i, torch.full((4,), float(i))))
    assert [lin.tau for lin in store.graphs] == pytest.approx([0.2, 0.3, 0.4]) and store.built == 5
    # same time, a state within round-off: the forward pass's stage; far off: none
    assert store.find(_RHS, 0.3, torch.full((4,), 3.0) * (1 + 1e-15), None) is store.graphs[1]
    assert store.find(_RHS, 0.3, torch.full((4,), 3.1), None) is None
    assert torch.equal(store.value_at(_RHS, 0.4, torch.full((4,), 4.0), None), torch.full((4,), 8.0))
    by_bytes = GraphStore(max_bytes=25)
    for i in range(4):
        by_bytes.add(_Lin(float(i), torch.zeros(1)))
    assert len(by_bytes) == 2 and by_bytes.held_bytes == 20 and by_bytes.built_bytes == 40


def test_an_evaluator_keeps_graphs_from_its_first_graph_step_on():
    evaluator = Evaluator(_RHS, graphs=GraphStore(), graph_stages=3, graphs_from_step=2)
    kept = []
    for _ in range(4):
        evaluator.step_started()
        kept.append([evaluator._keeps_graph(stage) for stage in range(4)])
    assert kept == [[False] * 4, [False] * 4, [True, True, True, False], [True, True, True, False]]


def test_graph_store_measures_the_first_graphs_and_takes_their_mean_for_the_rest():
    store = GraphStore(max_bytes=100, measured=2)
    sizes = []
    for i, nbytes in enumerate([10, 20, 999, 999]):  # the unmeasured graphs' own counts are not used
        sizes.append(store.measuring())
        store.add(_Lin(float(i), torch.zeros(1), nbytes))
    assert sizes == [True, True, False, False]
    assert [lin.graph_bytes for lin in store.graphs] == [10, 20, 15, 15] and store.built_bytes == 60


def test_graph_store_lookups_compare_only_the_graphs_at_their_stage_time():
    class CountingRHS(_RHS):
        calls = 0

        @classmethod
        def to_user(cls, u):
            cls.calls += 1
            return u

    store = GraphStore()
    times = [0.0, 0.5, 0.5, 1.0, 1.0 + 1e-15, 1.5] * 100  # re-taken stages an ulp apart, out of order
    for i, tau in enumerate(times):
        store.add(_Lin(tau + 2 * (i // 6), torch.full((4,), float(i))))
    # of the graphs at one stage time, the one at the same state (times within round-off match)
    found = store.find(CountingRHS, 2.0 * 99 + 0.5, torch.full((4,), 596.0), None)
    assert found is store.graphs[596] and CountingRHS.calls == 1
    assert store.find(CountingRHS, 2.0 * 99 + 1.0, torch.full((4,), 598.0), None) is store.graphs[598]
    assert store.find(CountingRHS, 2.0 * 99 + 1.0, torch.full((4,), 597.0), None) is store.graphs[597]
    assert store.find(CountingRHS, 2.0 * 99 + 0.75, torch.full((4,), 596.0), None) is None
    keyed = store.graphs[3]
    keyed.key = ("vec", 7)
    assert store.find(CountingRHS, keyed.tau, torch.zeros(4), ("vec", 7)) is keyed
    # a large state: the other stage at the same time is told apart on a sample, without a full
    # conversion or comparison; a second lookup at the same point and Vec compares nothing
    big = GraphStore()
    base = torch.linspace(1.0, 2.0, 50_000, dtype=torch.float64)
    big.add(_Lin(0.5, base * (1 + 1e-15)))
    big.add(_Lin(0.5, base + 1e-3))
    sizes = []

    class SizedRHS(_RHS):
        @staticmethod
        def to_user(u):
            sizes.append(u.numel())
            return u

    assert big.find(SizedRHS, 0.5, base.clone(), ("vec", 1)) is big.graphs[0]
    assert sorted(sizes) == [len(base[::12]), 50_000]
    assert big.find(SizedRHS, 0.5, base.clone(), ("vec", 1)) is big.graphs[0] and len(sizes) == 2
    # an exact store finds a graph at its own state only
    exact = GraphStore(exact=True)
    one = torch.ones(4, dtype=torch.float64)
    exact.add(_Lin(0.5, one))
    assert exact.find(_RHS, 0.5, one * (1 + 1e-15), None) is None
    assert exact.find(_RHS, 0.5, one.clone(), None) is exact.graphs[0]
    # dropping the oldest keeps the index in step with the graphs
    bounded = GraphStore(limit=2)
    for i, tau in enumerate([0.3, 0.1, 0.2]):
        bounded.make_room()
        bounded.add(_Lin(tau, torch.full((1,), float(i))))
    assert bounded.find(_RHS, 0.3, torch.zeros(1), None) is None
    assert bounded.find(_RHS, 0.1, torch.ones(1), None) is bounded.graphs[0]


def test_graphs_a_budget_drops_in_the_forward_pass_are_freed():
    """Graphs that do not fit the budget are dropped while the forward pass runs, without a backward
    pass through them; they must be freed (their saved tensors, measured by a pack hook, once made a
    reference cycle through the graph that Python's collector cannot see)."""
    import gc

    def graph_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)

    counts = []
    for _ in range(4):
        _, _, stats = _gradients("rk4", {"step_size": 0.05, "memory_budget": 20000})
        counts.append(graph_tensors())
    assert stats.adjoint.strategy == "graphs" and 0 < stats.adjoint.graphs_kept
    assert stats.adjoint.graphs_kept < stats.adjoint.steps * 4  # some were dropped
    assert counts[-1] == counts[1]


def test_partly_kept_graphs_in_float32_with_small_steps_equal_stored_states():
    """A budget that keeps only the latest graphs: the other stages' VJPs must be taken at their own
    stored states, never through a kept graph of another stage at the same time (rk4's two stages
    at t + h/2 lie within float32 round-off tolerance of each other for small h)."""
    torch.manual_seed(0)
    func = MLPField(dim=4)
    y0 = torch.randn(16, 4)

    def gradients(options):
        y = y0.detach().requires_grad_(True)
        stats = SolveStats()
        ys = odeint_adjoint_reported(func, y, torch.tensor([0.0, 1.0]), method="rk4",
                                  options={"step_size": 1 / 256, **options}, stats=stats)
        return torch.autograd.grad(ys[-1].square().sum(), (y, *func.parameters())), stats

    want, _ = gradients({"adjoint": "states"})
    for _ in range(2):  # the second call knows what a graph costs
        got, stats = gradients({"memory_budget": "1MiB"})
    assert stats.adjoint.strategy == "graphs" and 0 < stats.adjoint.graphs_kept < 4 * 256
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_the_pool_stays_under_its_bound_over_400_batch_sizes():
    func = LinearField(stable_matrix(3))
    pool.set_pool_limit("2MB")
    try:
        for batch in range(1, 401):
            y0 = torch.randn(batch, 3, dtype=torch.float64, requires_grad=True)
            pnode.odeint_adjoint(func, y0, torch.tensor([0.0, 0.5], dtype=torch.float64), method="rk4",
                                 options={"step_size": 0.25})[-1].sum().backward()
            assert pool.pool_bytes() <= 2 * 10**6
        assert pool.pooled_solvers() > 1
        pool.clear_cache()
        assert pool.pooled_solvers() == 0 and pool.pool_bytes() == 0
    finally:
        pool.set_pool_limit("1GB")


def test_a_checkpointing_budget_measures_a_step_s_graphs_and_reserves_room_for_them():
    # a budget far below the stored states: checkpoints from the first call on; the first call's
    # reversed steps measure what one step's graphs cost, so the next call keeps fewer checkpoints
    func = MLPField(dim=2, hidden=64).double()
    y0 = torch.randn(64, 2, dtype=torch.float64)
    stats = SolveStats()
    chosen = []
    for _ in range(2):
        ys = odeint_adjoint_reported(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                                  options={"step_size": 0.02, "memory_budget": 200_000}, stats=stats)
        ys[-1].sum().backward()
        chosen.append(stats.adjoint.checkpoints)
    assert stats.adjoint.strategy == "checkpoints"
    assert chosen[1] < chosen[0]  # the second call reserved one step's measured graphs


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_a_budget_keeping_the_last_steps_graphs_gives_the_stored_states_gradient_bit_for_bit(method, monkeypatch):
    fixed = {"step_size": 0.05}
    _, _, every = _gradients(method, {**fixed, "memory_budget": 10**9})  # all graphs: what they cost
    a = every.adjoint
    stages = a.graphs_kept // a.steps
    one = a.stored_bytes // a.steps  # states only
    every_stage = a.steps * (1 + stages) * one
    budget = a.solver_bytes + every_stage + a.graph_bytes // 4
    assert budget < a.solver_bytes + a.steps * one + a.graph_bytes  # too little for every graph
    _gradients(method, {**fixed, "memory_budget": budget})  # measures one step's graphs
    built = []
    evaluate_linearized = pnode._impl.rhs.RHS.evaluate_linearized

    def counted(self, *args, **kwargs):
        built.append(kwargs.get("forward"))  # True: built by the forward pass
        return evaluate_linearized(self, *args, **kwargs)

    monkeypatch.setattr(pnode._impl.rhs.RHS, "evaluate_linearized", counted)
    _, got, stats = _gradients(method, {**fixed, "memory_budget": budget})
    kept = stats.adjoint
    assert kept.strategy == "graphs" and kept.stage_states > 0 and 0 < kept.graphs_kept < a.graphs_kept
    assert built.count(True) == kept.graphs_kept  # the forward pass built no graph it would drop
    _, want, _ = _gradients(method, {**fixed, "adjoint": "states"})
    for g, w in zip(got, want):
        assert torch.equal(g, w)
