"""The per-step state machines without PETSc: step schedules driven by a stub TS, and the checkpointed
adjoint's reversal against a stub solver (``tests/stubs.py``). Each runs in float32 and float64 time
arithmetic, as a single- and a double-precision PETSc add their times."""

import numpy as np
import pytest
import torch
from stubs import StubSolver, StubTS, StubVec, run

from pnode._impl.checkpoint import CheckpointedAdjoint, CheckpointStore, planned_checkpoints, recomputed_steps
from pnode._impl.config import SolverConfig
from pnode._impl.evaluation import StageTimes
from pnode._impl.methods import resolve_method
from pnode._impl.schedule import ForwardRecord, OutputSchedule, ReplaySchedule, fixed_steps_in, same_time

REALS = [np.float32, np.float64]


@pytest.fixture(autouse=True)
def petsc_real(request, monkeypatch):
    """The schedules compare times at the round-off of PETSc's real type: a float32 run stands for a
    single-precision PETSc."""
    real = request.node.callspec.params.get("real", np.float64) if hasattr(request.node, "callspec") else np.float64
    monkeypatch.setattr("pnode._impl.schedule.petsc_eps", lambda: float(np.finfo(real).eps))


def _record(taus) -> ForwardRecord:
    record = ForwardRecord(taus=np.asarray(taus, dtype=np.float64), step_of_output=[0], step_times=[float(taus[0])],
                           stage_times=StageTimes())
    record.outputs = torch.zeros(len(taus), 1, dtype=torch.float64)
    return record


def _schedule(taus, method="dopri5", step_size=None, store=None):
    config = SolverConfig(method=resolve_method(method), rtol=1e-6, atol=1e-6, step_size=step_size)
    record = _record(taus)
    return OutputSchedule(config, record, store=store, explicit=True), record


@pytest.mark.parametrize("real", REALS)
def test_adaptive_steps_land_on_every_output_time_and_resume_their_size(real):
    schedule, record = _schedule([0.0, 0.3, 1.0])
    ts = StubTS(0.0, 0.07, real)
    sizes = run(schedule, ts, 1.0, observe=schedule.observe, propose=lambda dt: 1.5 * dt if dt < 0.07 else dt)
    assert len(record.step_of_output) == 3
    for step, tau in zip(record.step_of_output, record.taus):
        assert same_time(record.step_times[step], tau)
    cut = record.step_of_output[1]
    assert sizes[cut - 1] < 0.07 and sizes[cut] == pytest.approx(0.07, rel=1e-6)  # the uncut size comes back
    assert record.step_sizes == sizes


@pytest.mark.parametrize("real", REALS)
@pytest.mark.parametrize("retry", ["rejected", "newton failure"])
def test_a_retried_step_records_the_size_of_its_accepted_attempt(real, retry):
    schedule, record = _schedule([0.0, 1.0])
    ts = StubTS(0.0, 0.1, real)
    once = {"left": True}

    def first_attempt_of_step_3(k, dt):
        hit = k == 3 and once["left"]
        once["left"] = once["left"] and not hit
        return hit

    kwargs = {"reject": first_attempt_of_step_3} if retry == "rejected" else {"fail_newton": first_attempt_of_step_3}
    run(schedule, ts, 1.0, observe=schedule.observe, **kwargs)
    assert record.step_sizes[2] == pytest.approx(0.05, rel=1e-6)
    times = np.asarray(record.step_times, dtype=real)
    assert np.array_equal(times[:-1] + np.asarray(record.step_sizes, dtype=real), times[1:])  # PETSc's own sums
    assert record.stages == 4  # the first step was not retried: its evaluations are the method's stages


@pytest.mark.parametrize("real", REALS)
def test_fixed_steps_land_on_the_output_whatever_the_time_sum_drifts(real):
    # 1000 steps of 0.001 sum to 1 only roughly in float32: the planned last step lands on the output anyway
    schedule, record = _schedule([0.0, 1.0], method="rk4", step_size=0.001)
    ts = StubTS(0.0, 0.001, real)
    sizes = run(schedule, ts, 1.0, observe=schedule.observe)
    assert len(sizes) == fixed_steps_in(1.0, 0.001) == 1000
    assert len(record.step_of_output) == 2 and float(ts.time) == float(real(1.0))


@pytest.mark.parametrize("real", REALS)
@pytest.mark.parametrize("fsal", [True, False])
def test_fsal_is_told_from_the_evaluations_and_its_derivative_kept_with_each_state(real, fsal):
    store = CheckpointStore(2, planned=[3, 6])
    schedule, record = _schedule([0.0, 1.0], step_size=0.1, store=store)
    ts = StubTS(0.0, 0.1, real)
    run(schedule, ts, 1.0, observe=schedule.observe, fsal=fsal)
    assert record.fsal is fsal
    assert sorted(store.states) == [3, 6]
    assert sorted(store.derivatives) == ([3, 6] if fsal else [])
    if fsal:  # the last evaluation of step 3 (at its end) is what step 4 started from
        assert float(store.derivatives[3][0]) == pytest.approx(float(record.step_times[3]), rel=1e-6)


def test_replay_gives_the_recorded_sizes_and_refuses_more_steps():
    sizes = [0.1, 0.05, 0.2]
    mismatches = []

    def mismatch(taken):
        mismatches.append(taken)
        return RuntimeError(f"took {taken}")

    schedule, ts, given = ReplaySchedule(sizes, mismatch), StubTS(0.0, 0.1), []
    for _ in sizes:
        schedule.before_step(ts)
        given.append(ts.getTimeStep())
        ts.steps += 1
    assert given == pytest.approx(sizes)
    with pytest.raises(RuntimeError, match="took 4"):
        schedule.before_step(ts)
    assert mismatches == [4]


def test_a_discarded_step_forgets_its_stage_times():
    schedule, record = _schedule([0.0, 10.0])
    ts = StubTS(0.0, 0.5)
    schedule.before_step(ts)
    vec = StubVec([0.0])
    for tau in (0.0, 0.25, 0.5):
        schedule.observe(ts, tau, vec, None)
    before = {key: list(times) for key, times in record.stage_times.by_vec.items()}
    schedule.before_step(ts)
    for tau in (0.5, 0.75):
        schedule.observe(ts, tau, vec, None)
    schedule.discard_step()
    assert record.stage_times.by_vec == before


@pytest.mark.parametrize("planned", [False, True], ids=["from the start", "from the forward checkpoints"])
@pytest.mark.parametrize("checkpoints", [1, 2, 3])
@pytest.mark.parametrize("steps", list(range(1, 13)))
def test_checkpointed_reversal_reverses_each_step_once_with_the_fewest_recomputations(steps, checkpoints, planned):
    # from the initial state alone, the binomial schedule re-takes exactly its closed form's count of
    # steps; with the states the forward pass kept, no more
    times = [0.1 * k for k in range(steps + 1)]
    record = _record([0.0, times[-1]])
    record.step_times, record.step_sizes = times, [0.1] * steps
    record.step_of_output = [0, steps]
    record.outputs = torch.tensor([[0.0], [float(steps)]])
    record.fsal, record.stages = False, 4
    store = CheckpointStore(checkpoints, planned=planned_checkpoints(steps, checkpoints) if planned else [])
    for k in range(1, steps):  # the forward pass offers every state that is not an output's
        store.offer(k, torch.tensor([float(k)]))
    solver = StubSolver(times)
    adjoint = CheckpointedAdjoint(solver, None, checkpoints, keep_graphs=0)
    adjoint.run(record, store, torch.zeros(2, 1))
    assert solver.reversed == list(range(steps, 0, -1))  # every step once, last first
    assert adjoint.advanced_steps == solver.advanced
    if planned:
        assert solver.advanced <= recomputed_steps(steps, checkpoints)
    else:
        assert solver.advanced == recomputed_steps(steps, checkpoints)
    assert adjoint.peak_stored <= checkpoints
