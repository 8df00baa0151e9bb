"""The device path of the tensor <-> Vec bridge, tested where a CPU can test it.

With a CUDA state and a PETSc built with CUDA, pnode keeps every PETSc vector of a solve on the
state's GPU and lets torch see them through DLPack (:mod:`pnode._impl.bridge`). Without a GPU these tests
check the pieces of that path: where a solve's vectors live (the decision alone, PETSc and torch
stubbed), the access protocol that keeps PETSc's host/device offload mask right (on a fake Vec that
records its calls), the DLPack hand-over and its lifetime (petsc4py's ``toDLPack`` works on CPU Vecs
as on CUDA ones), and whole solves with every Vec viewed through DLPack, which must give what the
host views give, bit for bit. ``tests/test_gpu.py`` runs the path on a GPU.
"""

import types
import warnings

import numpy as np
import pytest
import torch
from problems import solve_case

import pnode
from pnode import _compat
from pnode._impl import bridge, pool
from pnode._impl.bridge import DEVICE, HOST, cached_views, tensor_into_vec, vec_key, vec_view, writable_view

CUDA0 = torch.device("cuda", 0)


# ------------------------------------------------------------------ where a solve's vectors live
@pytest.mark.parametrize("state, petsc_cuda, cuda_available, expected", [
    (torch.device("cpu"), False, False, "cpu"),
    (torch.device("cpu"), True, True, "cpu"),          # a CPU state stays on the host
    (CUDA0, True, True, "cuda:0"),                     # the state's GPU
    (torch.device("cuda", 1), True, True, "cuda:1"),
    (CUDA0, False, True, "cpu"),                       # PETSc without CUDA: staged through the host
    (CUDA0, True, False, "cpu"),                       # no GPU seen: a CUDA Vec would abort the process
])
def test_vectors_live_on_the_state_gpu_only_when_petsc_and_torch_have_cuda(state, petsc_cuda, cuda_available,
                                                                           expected):
    assert bridge.choose_vec_device(state, petsc_cuda, cuda_available) == torch.device(expected)


def test_a_cuda_state_on_a_petsc_without_cuda_is_staged_with_one_warning_naming_the_fix(monkeypatch):
    monkeypatch.setattr(bridge, "petsc_has_cuda", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bridge, "_STAGING_WARNED", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        devices = [bridge.vec_device(CUDA0) for _ in range(3)]
    assert devices == [bridge.CPU] * 3
    assert len(seen) == 1
    assert "PNODE_CUDA=1 VENV=.venv-cuda bash scripts/setup.sh" in str(seen[0].message)


def test_a_cpu_state_asks_neither_petsc_nor_torch_about_cuda(monkeypatch):
    def refuse():
        raise AssertionError("asked about CUDA for a CPU state")

    monkeypatch.setattr(bridge, "petsc_has_cuda", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", refuse)
    assert bridge.vec_device(torch.device("cpu")) == bridge.CPU


def test_the_pool_keeps_solvers_of_different_vector_devices_apart(monkeypatch):
    y0 = torch.ones(3, dtype=torch.float64)
    problem = pnode._impl.problem.check_inputs(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]), 1e-7, 1e-9, "rk4",
                                         {"step_size": 0.5}, None)
    host_key = pool.pool_key(problem, 0, False)
    monkeypatch.setattr(pool, "vec_device", lambda device: CUDA0)
    assert pool.pool_key(problem, 0, False) != host_key
    assert pool.pool_key(problem, 0, False)[-1] == CUDA0


def test_shell_operators_of_a_gpu_solver_make_cuda_vectors():
    from pnode._impl.operators import RHSJacobianShell, create_shell

    mat = create_shell(RHSJacobianShell(None), 4, 4, pnode._compat.PETSc.COMM_SELF)
    try:
        default = mat.getVecType()
        bridge.place_operator(mat, bridge.CPU)
        assert mat.getVecType() == default
        bridge.place_operator(mat, CUDA0)  # only names the type; no vector is made here
        assert mat.getVecType() == "cuda"
    finally:
        mat.destroy()


def test_a_cuda_petsc_starts_without_gpu_aware_mpi_unless_told(monkeypatch):
    monkeypatch.setattr(_compat, "configured_with", lambda macro: macro == "PETSC_HAVE_CUDA")
    monkeypatch.delenv("PETSC_OPTIONS", raising=False)
    assert _compat._with_device_defaults(["prog", "-ts_type", "cn"]) == [
        "prog", "-use_gpu_aware_mpi", "0", "-ts_type", "cn"]
    # without a program name (pnode.init([])), petsc4py adds one before the first word: the pair "-options_left no"
    # must stay together
    assert _compat._with_device_defaults(["-options_left", "no"]) == ["-use_gpu_aware_mpi", "0", "-options_left", "no"]
    assert _compat._with_device_defaults(["prog", "-use_gpu_aware_mpi", "1"]) == ["prog", "-use_gpu_aware_mpi", "1"]
    monkeypatch.setenv("PETSC_OPTIONS", "-use_gpu_aware_mpi 1")
    assert _compat._with_device_defaults(["prog"]) == ["prog"]
    monkeypatch.setattr(_compat, "configured_with", lambda macro: False)
    monkeypatch.delenv("PETSC_OPTIONS")
    assert _compat._with_device_defaults(["prog"]) == ["prog"]


# ------------------------------------------------------------------ the access protocol, on a fake Vec
class RecordingVec:
    """A stand-in for a petsc4py Vec of type ``vec_type`` that records what pnode asks of it.

    ``toDLPack`` hands out its data through DLPack (as PETSc does, after its get/restore in that
    mode), ``getArray`` as NumPy; ``calls`` lists them in order.
    """

    _ids = iter(range(10**6, 2 * 10**6))

    def __init__(self, vec_type: str, n: int = 4):
        self.vec_type = vec_type
        self.data = torch.arange(float(n), dtype=torch.float64)
        self.calls = []
        self.state = 0
        self.handle = next(self._ids)  # petsc4py's address of the Vec (3.18 has no object ids)

    def getType(self):
        return self.vec_type

    def toDLPack(self, mode):
        self.calls.append(("toDLPack", mode))
        if mode != "r":
            self.state += 1  # PETSc's restore of a write access raises the state
        return torch.utils.dlpack.to_dlpack(self.data)

    def getArray(self, readonly=False):
        self.calls.append(("getArray", readonly))
        array = self.data.numpy().view()
        if readonly:
            array.flags.writeable = False  # as petsc4py's
        return array

    def stateIncrease(self):
        self.calls.append(("stateIncrease",))
        self.state += 1


def test_a_cuda_vec_is_read_through_dlpack_in_read_mode():
    vec = RecordingVec("seqcuda")
    view = vec_view(vec)
    assert vec.calls == [("toDLPack", "r")]
    assert view.data_ptr() == vec.data.data_ptr()  # a view, not a copy


@pytest.mark.parametrize("keep, mode", [(False, "w"), (True, "rw")])
def test_a_write_to_a_cuda_vec_declares_it_in_the_mode_that_keeps_the_offload_mask_right(keep, mode):
    vec = RecordingVec("mpicuda")
    writable_view(vec, keep=keep).fill_(7.0)
    assert vec.calls == [("toDLPack", mode)]  # no host array, no state raised by hand: PETSc's restore does it
    assert vec.state == 1
    assert bool((vec.data == 7.0).all())


def test_cuda_vecs_are_viewed_afresh_at_each_access_within_a_petsc_call():
    vec = RecordingVec("seqcuda")
    with cached_views():
        for _ in range(3):
            vec_view(vec)
            tensor_into_vec(torch.ones(4), vec)
    assert vec.calls == [("toDLPack", "r"), ("toDLPack", "w")] * 3


def test_host_vecs_are_viewed_once_per_petsc_call_and_every_write_raises_the_state():
    vec = RecordingVec("mpi")
    with cached_views():
        for _ in range(3):
            vec_view(vec)
            tensor_into_vec(torch.ones(4), vec)
    assert vec.calls == [("getArray", True), ("stateIncrease",), ("getArray", False), ("stateIncrease",),
                         ("stateIncrease",)]
    assert vec.state == 3


def test_the_vector_size_of_a_solver_is_known_without_reading_the_vector():
    from pnode._impl.strategies import state_bytes

    class Unreadable:
        def getLocalSize(self):
            return 10

        def getArray(self, readonly=False):
            raise AssertionError("a CUDA Vec's getArray copies it to the host")

    assert state_bytes(types.SimpleNamespace(solution=Unreadable())) == 10 * bridge.petsc_dtype().itemsize


# ------------------------------------------------------------------ the DLPack hand-over, on real Vecs
def _vec(values):
    vec = pnode._compat.PETSc.Vec().createMPI((len(values), pnode._compat.PETSc.DECIDE),
                                              comm=pnode._compat.PETSc.COMM_SELF)
    vec.setArray(np.asarray(values, dtype=pnode._compat.PETSc.ScalarType))
    return vec


def test_a_dlpack_view_shares_the_vectors_memory_both_ways():
    vec = _vec([1.0, 2.0, 3.0])
    try:
        view = DEVICE.read(vec)
        assert view.tolist() == [1.0, 2.0, 3.0]
        vec.set(4.0)  # PETSc writes, the view sees it
        assert view.tolist() == [4.0, 4.0, 4.0]
        DEVICE.write(vec, keep=True).mul_(2.0)  # torch writes, PETSc sees it
        assert vec.getArray(readonly=True).tolist() == [8.0, 8.0, 8.0]
        assert vec.norm() == pytest.approx(8.0 * 3 ** 0.5)  # not a norm cached before the write
    finally:
        vec.destroy()


def test_only_a_write_access_changes_the_vectors_key():
    vec = _vec([1.0, 2.0])
    try:
        key = vec_key(vec)
        DEVICE.read(vec)
        assert vec_key(vec) == key
        DEVICE.write(vec, keep=False)
        assert vec_key(vec) != key
        key = vec_key(vec)
        HOST.write(vec, keep=False)
        assert vec_key(vec) != key
    finally:
        vec.destroy()


def test_a_dlpack_view_keeps_its_vector_alive():
    vec = _vec([5.0, 6.0])
    references = vec.getRefCount()
    view = DEVICE.read(vec)
    assert vec.getRefCount() == references + 1
    vec.destroy()  # pnode's handle goes; the view still holds PETSc's object and its memory
    assert view.tolist() == [5.0, 6.0]
    del view


# ------------------------------------------------------------------ whole solves through DLPack views
def _mlp(dtype):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _solve_and_differentiate(case, dtype):
    """Outputs and gradients (y0, parameters) of one small solve of ``case``."""
    torch.manual_seed(2)
    y0 = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    return solve_case(case, _mlp(dtype), y0, torch.tensor([0.0, 0.5, 1.0], dtype=dtype))


CASES = [
    ("rk4", {"step_size": 0.1}, "odeint_adjoint"),
    ("rk4", {"step_size": 0.1}, "odeint"),
    ("dopri5", {}, "odeint_adjoint"),
    ("dopri5", {}, "odeint"),
    ("dopri5", {"checkpoints": 2}, "odeint_adjoint"),
    ("cn", {"step_size": 0.1}, "odeint_adjoint"),
    ("beuler", {"step_size": 0.25}, "odeint_adjoint"),
    ("tuple", {}, "odeint_adjoint"),
    ("event", {}, "odeint_adjoint"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{'-'.join(map(str, c[1].values()))}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_solves_through_dlpack_views_equal_solves_through_host_views_bit_for_bit(monkeypatch, case, dtype):
    host = _solve_and_differentiate(case, dtype)
    pnode.clear_cache()
    monkeypatch.setattr(bridge, "access_of", lambda vec: DEVICE)  # every Vec as a CUDA Vec is seen
    try:
        through_dlpack = _solve_and_differentiate(case, dtype)
    finally:
        pnode.clear_cache()
    for got, want in zip(through_dlpack, host):
        assert torch.equal(got, want)
