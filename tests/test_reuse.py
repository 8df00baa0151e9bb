"""What pnode reuses from one call to the next (and what it must not), without changing a result.

Linearizations and VJPs recognised by their Vec's (address, state), pooled solvers (but not their
PETSc trajectories), checkpoint buffers, and the binomial plan of a fixed-step checkpointed solve.
"""


import ctypes
import gc

import numpy as np
import pytest
import torch
from conftest import CheckpointSpy, rel_err
from problems import MLPField

import pnode
from pnode._compat import PETSc
from pnode._impl import bridge
from pnode._impl import solver as pnode_solver
from pnode._impl.bridge import layout_of, tensor_into_vec, vec_key, vec_view, writable_view
from pnode._impl.checkpoint import CheckpointStore, planned_checkpoints, recomputed_steps
from pnode._impl.config import SolverConfig
from pnode._impl.methods import resolve_method
from pnode._impl.rhs import RHS, EvaluationCounter
from pnode._impl.schedule import expected_steps
from pnode._impl.solver import ForwardPlan, Replay, Solver, Span
from pnode.allocator import _glibc
from pnode.testing.references import TABLEAUS, rk_solve


def _grads(ys, w, wrt):
    return torch.autograd.grad((ys * w).sum(), wrt)


def test_every_write_changes_the_vec_key_and_reads_do_not():
    vec = PETSc.Vec().createSeq(6)
    key = vec_key(vec)
    vec_view(vec).sum()
    assert vec_key(vec) == key
    tensor_into_vec(torch.arange(6.0), vec)
    assert vec_key(vec) != key
    key = vec_key(vec)
    writable_view(vec)[0] = 5.0
    assert vec_key(vec) != key
    key = vec_key(vec)
    vec.scale(2.0)
    assert vec_key(vec) != key
    assert vec_key(vec.duplicate())[0] != key[0]
    # PETSc caches norms by state: a write through the bridge must not leave a stale one
    assert float(vec.norm()) == pytest.approx(float(torch.from_numpy(vec.getArray().copy()).norm()))
    tensor_into_vec(torch.zeros(6), vec)
    assert float(vec.norm()) == 0.0


def test_vjp_is_reused_only_for_the_same_unchanged_cotangent_vec():
    func = MLPField().double()
    y = torch.randn(2, 3, dtype=torch.float64)
    counter = EvaluationCounter()
    rhs = RHS(func, layout_of(y), tuple(func.parameters()), 1.0, counter)
    lin = rhs.linearize(0.3, y.reshape(-1))
    x = PETSc.Vec().createSeq(6)
    tensor_into_vec(torch.randn(6, dtype=torch.float64), x)
    first = lin.vjp(vec_view(x), vec_key(x))
    again = lin.vjp(vec_view(x), vec_key(x))
    assert again is first and counter.vjp == 1
    tensor_into_vec(torch.randn(6, dtype=torch.float64), x)  # same Vec, new contents
    changed = lin.vjp(vec_view(x), vec_key(x))
    assert counter.vjp == 2
    yy = y.reshape(-1).clone().requires_grad_(True)
    out = func(torch.tensor(0.3, dtype=torch.float64), yy.reshape(2, 3)).reshape(-1)
    (want,) = torch.autograd.grad(out, yy, vec_view(x))
    assert rel_err(changed[0], want) < 1e-15


def test_every_recording_solve_gets_a_new_trajectory_and_stays_exact(monkeypatch):
    # PETSc's memory trajectory is not safe to reuse after a segmented adjoint or for a longer solve:
    # pnode gives every recording solve a new one, also when pooled solvers alternate spans.
    renewals = []
    original = pnode_solver.renew_trajectory
    monkeypatch.setattr(pnode_solver, "renew_trajectory", lambda *args: (renewals.append(1), original(*args)))
    func = MLPField(dim=5).double()
    for n, t_end in enumerate((1.0, 1.0, 2.0, 1.0, 0.75), 1):
        y0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0.0, 0.125, 0.5 * t_end, t_end], dtype=torch.float64)
        ys = pnode.odeint_adjoint(func, y0, t, method="rk4", options={"step_size": 0.125})
        ref = rk_solve(func, y0, t.tolist(), 0.125, TABLEAUS["rk4"])
        w = torch.randn_like(ref)
        for g, r in zip(_grads(ys, w, (y0, *func.parameters())), _grads(ref, w, (y0, *func.parameters()))):
            assert rel_err(g, r) < 1e-12
        assert len(renewals) == n


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _live_heap_bytes():
    """Bytes the C allocator has handed out and not had back (glibc >= 2.33), or None elsewhere."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    mallinfo2 = libc.mallinfo2
    mallinfo2.restype = _MallInfo2
    gc.collect()
    info = mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.parametrize("options", [{"step_size": 1 / 16}, {"step_size": 1 / 16, "checkpoints": 2}, None],
                         ids=["store-all", "checkpointed", "inference"])
def test_a_pooled_solver_holds_no_trajectory_or_outputs_between_calls(options):
    # Between calls a pooled solver should hold its PETSc work vectors only, the same after a long
    # solve as after a short one: not the last solve's trajectory (16 steps of a 1 MB state, with
    # their stages) nor its copy of the outputs (9 states).
    if _live_heap_bytes() is None:
        pytest.skip("needs glibc's mallinfo2 to count live heap bytes")
    func = MLPField(dim=512).double()
    y0 = torch.randn(256, 512, dtype=torch.float64)
    state_bytes = y0.numel() * 8

    def call(t):
        if options is None:
            with torch.no_grad():
                pnode.odeint(func, y0, t, method="rk4", options={"step_size": 1 / 16})
            return
        ys = pnode.odeint_adjoint(func, y0.clone().requires_grad_(True), t, method="rk4", options=options)
        ys.sum().backward()

    short, long = torch.tensor([0.0, 0.125], dtype=torch.float64), torch.linspace(0.0, 1.0, 9, dtype=torch.float64)
    for _ in range(2):
        call(short)  # the pooled solver and its work vectors
    after_short = _live_heap_bytes()
    call(long)  # one solver serves both: output times are not part of its pool key
    held = _live_heap_bytes() - after_short
    assert held < state_bytes, f"a longer call left {held / state_bytes:.1f} more states' worth of memory behind"


@pytest.mark.parametrize("options", [{"step_size": 1 / 16}, {"step_size": 1 / 16, "checkpoints": 2}],
                         ids=["store-all", "checkpointed"])
def test_a_backward_pass_that_frees_the_graph_frees_the_record_while_the_outputs_live_on(options):
    # The outputs (and so the autograd graph with its saved inputs) outlive the backward pass here,
    # as when a training loop keeps its predictions: the record (the copy of the outputs, the
    # forward record) must go when the backward pass ends, not when the outputs do.
    if _live_heap_bytes() is None:
        pytest.skip("needs glibc's mallinfo2 to count live heap bytes")
    func = MLPField(dim=512).double()
    y0 = torch.randn(256, 512, dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 9, dtype=torch.float64)

    def call():
        ys = pnode.odeint_adjoint(func, y0.clone().requires_grad_(True), t, method="rk4", options=options)
        ys.sum().backward()
        return ys

    call()  # the pooled solver and its work vectors
    before = _live_heap_bytes()
    kept = call()
    state_bytes = y0.numel() * 8
    # what the caller holds: the outputs, and through their graph the leaf y0 and its gradient
    held = _live_heap_bytes() - before - kept.numel() * kept.element_size() - 2 * state_bytes
    assert held < state_bytes, f"{held / state_bytes:.1f} states' worth of memory held with the outputs"


def test_checkpoint_store_recycles_its_buffers():
    store = CheckpointStore(3)
    buffers = set()
    for step in range(1, 100):
        store.offer(step, torch.full((4,), float(step)))
        buffers.update(s.data_ptr() for s in store.states.values())
    assert len(buffers) <= 3  # dropped states' buffers were reused, never freed and reallocated
    assert all(float(v[0]) == k for k, v in store.states.items())
    assert store.release(max(store.states)) and not store.release(10**6)
    taken = store.take(torch.ones(4))
    assert taken.data_ptr() in buffers and float(taken.sum()) == 4.0


@pytest.mark.parametrize("t,step", [([0.0, 1.0], 1 / 64), ([0.0, 0.35, 1.0], 0.05), ([0.0, 0.3, 0.6, 1.0], 0.1),
                                    ([0.0, 1.0], 0.3)])
def test_expected_steps_is_what_the_solver_takes(t, step):
    config = SolverConfig(method=resolve_method("rk4"), rtol=1e-6, atol=1e-8, step_size=step)
    taus = torch.tensor(t, dtype=torch.float64).numpy()
    func = MLPField().double()
    y0 = torch.randn(2, 3, dtype=torch.float64)
    solver = Solver(config, 6, 0, PETSc.COMM_SELF, record=False)
    record = solver.forward(RHS(func, layout_of(y0), (), 1.0), Span(taus), y0.reshape(-1))
    assert expected_steps(config, taus) == len(record.step_times) - 1


@pytest.mark.parametrize("steps", [16, 64, 100])
@pytest.mark.parametrize("checkpoints", [2, 4, 8])
def test_fixed_steps_store_the_binomial_plan_and_recompute_near_the_bound(monkeypatch, steps, checkpoints):
    spy = CheckpointSpy(monkeypatch)
    func = MLPField().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="euler",
                              options={"step_size": 1 / steps, "checkpoints": checkpoints})
    ys[-1].sum().backward()
    (adjoint,), (stored,) = spy.runs, spy.stored
    assert stored == planned_checkpoints(steps, checkpoints)
    assert adjoint.peak_stored <= checkpoints
    # Griewank & Walther's minimum, less the forward pass itself: pnode's forward pass ends at the
    # last step, not one before it as Revolve's does, so it may need a few more
    bound = recomputed_steps(steps, checkpoints) - (steps - 1)
    assert bound <= adjoint.advanced_steps <= 1.03 * bound + 2


def test_a_solver_without_adjoint_vectors_refuses_to_record():
    config = SolverConfig(method=resolve_method("rk4"), rtol=1e-6, atol=1e-8, step_size=0.25)
    y0 = torch.randn(6, dtype=torch.float64)
    solver = Solver(config, 6, 0, PETSc.COMM_SELF, record=False)
    rhs = RHS(MLPField().double(), layout_of(y0.reshape(2, 3)), (), 1.0)
    with pytest.raises(ValueError, match="record=False.*cannot record"):
        solver.replay(rhs, y0, Replay(np.array([0.0, 0.25]), [0.25], trajectory=True))


@pytest.mark.parametrize("method,fsal", [("dopri5", True), ("bosh3", True), ("adaptive_heun", False), ("rk4", False)])
def test_a_checkpointed_forward_tells_fsal_methods_and_keeps_their_reused_derivatives(method, fsal):
    """dopri5 and bosh3 start each step from the previous step's last derivative (FSAL): the
    store keeps that derivative with each kept state and output step, exactly as f gave it."""
    config = SolverConfig(method=resolve_method(method), rtol=1e-6, atol=1e-8,
                          step_size=None if resolve_method(method).adaptive else 0.05)
    y0 = torch.randn(6, dtype=torch.float64)
    solver = Solver(config, 6, 0, PETSc.COMM_SELF, record=True)
    func = MLPField().double()
    layout = layout_of(y0.reshape(2, 3))
    rhs = RHS(func, layout, (), 1.0)
    store = CheckpointStore(3)
    taus = np.array([0.0, 0.4, 1.0])
    record = solver.forward(rhs, Span(taus), y0, ForwardPlan(store=store, adjoint=True))
    assert record.fsal is fsal
    if not fsal:
        assert not store.derivatives
        return
    output_steps = set(record.step_of_output[1:-1])
    assert set(store.derivatives) == set(store.states) | output_steps and store.states
    # the derivative kept with step k is f at the last stage of step k, which for an FSAL tableau
    # is the new state up to round-off (the stage and the solution sum the same terms differently)
    for step, derivative in store.derivatives.items():
        state = store.states[step] if step in store.states else record.outputs[record.step_of_output.index(step)]
        with torch.no_grad():
            at_state = layout.flatten(func(torch.tensor(record.step_times[step], dtype=torch.float64),
                                           layout.unflatten(state)))
        assert not torch.equal(derivative, torch.zeros_like(derivative))
        assert rel_err(derivative, at_state) < 1e-12



_EXIT_SCRIPT = """
import sys, torch, pnode
f = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
t = torch.tensor([0.0, 0.5])
y0 = torch.randn(4, 3, requires_grad=True)
pnode.ODEBlock(lambda t, y: torch.sin(y), t=(0.0, 1.0), method="rk4", options={"step_size": 0.25})(y0.detach())
pnode.odeint_adjoint(lambda t, y: f(y), y0, t, method="rk4", options={"step_size": 0.1})[-1].sum().backward()
if sys.argv[1] == "held":  # this solver stays with the graph, out of the pool
    held = pnode.odeint_adjoint(lambda t, y: f(y), y0, t, method="dopri5")
if sys.argv[1] == "finalized":  # the script finalised PETSc itself: nothing may be destroyed after
    from petsc4py import PETSc
    PETSc._finalize()
print("solved")
"""


@pytest.mark.parametrize("solvers", ["idle", "held", "finalized"])
def test_the_interpreter_exits_cleanly_with_pooled_and_held_solvers(solvers):
    """PETSc finalises after Python: a solver it destroyed then called into a finished interpreter
    (a segmentation fault at exit with petsc4py 3.18)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, solvers], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip() == "solved"


def test_cached_views_never_hand_a_freed_vec_s_view_to_a_new_vec():
    # Views are cached by a Vec's address for one PETSc call; a Vec freed inside the call must not
    # pass its view (and its values) to a new Vec that PETSc places at the same address.
    with bridge.cached_views():
        for value in range(20):
            vec = PETSc.Vec().createSeq(3, comm=PETSc.COMM_SELF)
            vec.set(float(value))
            assert bridge.vec_view(vec).tolist() == [float(value)] * 3
            bridge.writable_view(vec).fill_(value + 0.5)
            assert vec.getArray(readonly=True).tolist() == [value + 0.5] * 3
            del vec  # PETSc frees it unless the cache keeps it alive
