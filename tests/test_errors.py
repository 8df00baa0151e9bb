"""Bad input and failed solves raise pnode exceptions that say what happened and what to try."""

import subprocess
import sys

import pytest
import torch
from conftest import command_line
from problems import LinearField, MLPField, stable_matrix

import pnode
from pnode._compat import PETSc

T01 = torch.tensor([0.0, 1.0], dtype=torch.float64)


def _y0(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("name", ["gl6", "explicit_adams", "scipy_solver", "rk45"])
def test_unknown_method_lists_available_ones(name):
    with pytest.raises(ValueError, match=r"not available with PETSc.*choose one of: euler, midpoint, rk4"):
        pnode.odeint(lambda t, y: -y, _y0(3), T01, method=name)


def test_non_finite_y0():
    y0 = _y0(3)
    y0[1] = float("nan")
    with pytest.raises(pnode.InputError, match="y0 contains NaN or inf"):
        pnode.odeint(lambda t, y: -y, y0, T01)


def test_wrong_output_shape():
    with pytest.raises(pnode.InputError, match=r"func returned shape \(3, 2\) for a state of shape \(3, 4\)"):
        pnode.odeint(lambda t, y: y[:, :2], _y0(3, 4), T01, method="euler")


def test_wrong_output_dtype():
    with pytest.raises(pnode.InputError, match="func returned dtype torch.float32 for a state of dtype torch.float64"):
        pnode.odeint(lambda t, y: y.float(), _y0(3), T01, method="rk4")


def test_wrong_output_structure():
    with pytest.raises(pnode.InputError, match="func returned a tensor of shape"):
        pnode.odeint(lambda t, s: s[0], (_y0(2), _y0(2)), T01, method="rk4")


@pytest.mark.parametrize("t", [[0.0, 1.0, 1.0], [0.0, 1.0, 0.5], [1.0, 0.0, 0.5]])
def test_non_monotonic_t(t):
    with pytest.raises(pnode.InputError, match="strictly increasing or strictly decreasing"):
        pnode.odeint(lambda t, y: -y, _y0(3), torch.tensor(t, dtype=torch.float64))


def test_t_must_be_1d():
    with pytest.raises(pnode.InputError, match="1-D tensor"):
        pnode.odeint(lambda t, y: -y, _y0(3), torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("h", [0.0, -0.1, float("nan")])
def test_bad_step_size(h):
    with pytest.raises(pnode.InputError, match=r"options\['step_size'\] must be finite and > 0"):
        pnode.odeint(lambda t, y: -y, _y0(3), T01, method="rk4", options={"step_size": h})


def test_non_float_state():
    with pytest.raises(pnode.InputError, match="floating point"):
        pnode.odeint(lambda t, y: y, torch.ones(3, dtype=torch.int64), T01)


@pytest.mark.skipif(not hasattr(PETSc.Options(), "used"), reason="petsc4py < 3.19 cannot tell unused options")
def test_unknown_option_is_reported():
    with pytest.raises(pnode.InputError, match="not used by PETSc"):
        pnode.odeint(lambda t, y: -y, _y0(3), T01, options={"stepsize": 0.1})


def test_unsupported_torchdiffeq_option():
    with pytest.raises(pnode.InputError, match=r"options\['perturb'\] is a torchdiffeq option pnode cannot honour"):
        pnode.odeint(lambda t, y: -y, _y0(3), T01, method="rk4", options={"perturb": True})


def test_adjoint_method_must_match():
    with pytest.raises(pnode.InputError, match="adjoint_method='rk4' differs from method='dopri5'"):
        pnode.odeint_adjoint(lambda t, y: -y, _y0(3), T01, method="dopri5", adjoint_method="rk4")


def test_adjoint_tolerances_warn():
    y0 = _y0(3).requires_grad_(True)
    with pytest.warns(UserWarning, match="adjoint_rtol ignored"):
        pnode.odeint_adjoint(lambda t, y: -y, y0, T01, adjoint_rtol=1e-3)


def test_finite_time_blow_up_adaptive():
    # dy/dt = y^2, y(0) = 1 blows up at t = 1.
    with pytest.raises(pnode.SolverError, match=r"non-finite") as info:
        pnode.odeint(lambda t, y: y * y, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 2.0]).double())
    assert 0.9 < info.value.t_reached < 1.1  # the numerical solution blows up near t = 1


def test_finite_time_blow_up_fixed_steps_reports_nonfinite():
    with pytest.raises(pnode.SolverError, match="became non-finite") as info:
        pnode.odeint(lambda t, y: y * y, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 3.0]).double(),
                     method="rk4", options={"step_size": 0.25})
    assert info.value.reason == "NONFINITE_STATE"
    assert info.value.t_reached <= 3.0


def test_nan_mid_solve():
    def f(t, y):
        return y * float("nan") if t > 0.5 else -y

    with pytest.raises(pnode.SolverError, match="non-finite"):
        pnode.odeint(f, _y0(3), T01, method="euler", options={"step_size": 0.1})


def test_max_num_steps():
    with pytest.raises(pnode.SolverError, match="max_num_steps"):
        pnode.odeint(lambda t, y: -y, _y0(3), T01, method="rk4", options={"step_size": 0.01, "max_num_steps": 10})


def test_exception_in_func_propagates_unchanged():
    class Boom(Exception):
        pass

    def f(t, y):
        raise Boom("from user code")

    with pytest.raises(Boom, match="from user code"):
        pnode.odeint(f, _y0(3), T01)


def test_an_exception_in_a_step_hook_surfaces_as_itself_not_as_a_petsc_error_code(monkeypatch):
    # pnode's own pre/post-step hooks run inside PETSc: an error there used to reach the caller as
    # "PETSc failed ...: error code 101" with the Python cause lost
    from pnode._impl.schedule import OutputSchedule

    def broken(self, ts):
        raise LookupError("the hook's own error")

    monkeypatch.setattr(OutputSchedule, "after_step", broken)
    with pytest.raises(LookupError, match="the hook's own error") as info:
        pnode.odeint(lambda t, y: -y, _y0(3), T01, method="rk4", options={"step_size": 0.25})
    if sys.version_info >= (3, 11):  # exception notes (PEP 678)
        assert any("PETSc callback of pnode's forward solve, at t=" in note for note in info.value.__notes__)


def test_exception_in_backward_propagates():
    func = MLPField().double()
    calls = {"n": 0}

    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = func

        def forward(self, t, y):
            if torch.is_grad_enabled():
                raise RuntimeError("VJP failed on purpose")
            calls["n"] += 1
            return self.inner(t, y)

    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint_adjoint(Flaky(), y0, T01, method="rk4", options={"step_size": 0.5})
    with pytest.raises(RuntimeError, match="VJP failed on purpose"):
        ys.sum().backward()
    # the solver is usable again afterwards
    ys = pnode.odeint_adjoint(func, y0, T01, method="rk4", options={"step_size": 0.5})
    ys.sum().backward()
    assert torch.isfinite(y0.grad).all()


def test_missing_petsc4py_says_how_to_install_at_the_first_solve():
    # importing pnode needs no PETSc (it initialises nothing); the first solve does
    code = ("import sys; sys.modules['petsc4py'] = None\nimport torch, pnode\n"
            "pnode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "pip install --no-build-isolation petsc==3.26.1 petsc4py==3.26.1" in proc.stderr


def test_options_must_be_a_dict():
    with pytest.raises(pnode.InputError, match="options must be a dict, got list"):
        pnode.odeint(lambda t, y: -y, _y0(3), T01, options=[("step_size", 0.1)])


def test_failed_implicit_adjoint_solve_raises_instead_of_a_wrong_gradient():
    # From y0 = 0 the forward Newton solves of a linear field converge at once; the adjoint's
    # transposed solves get a nonzero right-hand side and cannot converge in 2 unpreconditioned
    # GMRES iterations.
    func = LinearField(stable_matrix(30) * 20)
    y0 = torch.zeros(2, 30, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint_adjoint(func, y0, T01, method="cn", options={"step_size": 0.25, "ksp_max_it": 2,
                                                                    "ksp_rtol": 1e-13, "jacobian": "matrix_free"})
    with pytest.raises(pnode.SolverError, match="DIVERGED_ITS.*adjoint's transposed linear solve") as info:
        (ys[-1] * torch.randn(2, 30, dtype=torch.float64)).sum().backward()
    assert info.value.reason.startswith("PETSC_ERROR")


def test_checkpointing_a_nondeterministic_function_is_reported():
    noisy = [False]
    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        out = torch.tanh(y @ W) - y
        return out + 50.0 * torch.randn_like(y) if noisy[0] else out

    ys = pnode.odeint_adjoint(f, _y0(2, 3), T01, method="bosh3", rtol=1e-6, atol=1e-8,
                              options={"checkpoints": 2}, adjoint_params=(W,))
    noisy[0] = True  # the recomputation in the backward pass no longer reproduces the forward pass
    with pytest.raises(pnode.SolverError, match="not deterministic") as info:
        ys[-1].sum().backward()
    assert info.value.reason == "REPLAY_MISMATCH"


@pytest.mark.parametrize("checkpoints", [2, 8], ids=["advance", "re-take only"])
def test_checkpointing_that_recomputes_a_nonfinite_state_is_reported(checkpoints):
    broken = [False]
    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        out = torch.tanh(y @ W) - y
        return out * float("nan") if broken[0] else out

    options = {"step_size": 0.125, "checkpoints": checkpoints}  # 8 steps: K = 8 keeps every state
    ys = pnode.odeint_adjoint(f, _y0(2, 3), T01, method="rk4", options=options, adjoint_params=(W,))
    broken[0] = True  # fixed steps: the recomputation takes as many steps, ending in NaN
    with pytest.raises(pnode.SolverError, match="became non-finite") as info:
        ys[-1].sum().backward()
    assert info.value.reason == "NONFINITE_STATE"


def test_bad_checkpoint_budget_on_the_command_line_names_the_option():
    with command_line(pnode_checkpoints="two"), \
            pytest.raises(pnode.InputError, match="-pnode_checkpoints must be a whole number"):
        pnode.odeint_adjoint(lambda t, y: -y, _y0(2).requires_grad_(True), T01, method="rk4")


@pytest.mark.parametrize("kwargs", [{"op": "min"}, {"op": "max", "average": True}])
def test_gather_metrics_refuses_an_unknown_reduction(kwargs):
    from pnode import distributed

    with pytest.raises(pnode.InputError, match="op must be 'sum' or 'max'"):
        distributed.gather_metrics({"peak_mb": 1.0}, **kwargs)
    assert distributed.gather_metrics({"peak_mb": 2.0}, op="max") == {"peak_mb": 2.0}


def test_kencarp_gradients_are_refused_where_petsc_has_no_arkimex_adjoint():
    """kencarp* run on PETSc's ARKIMEX, whose adjoint arrived in 3.19 and took its current form in 3.20:
    on an older PETSc (Debian's 3.18) odeint_adjoint refuses them up front and names what works."""
    from pnode._compat import petsc_version

    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = _y0(2, 3)

    def f(t, y):
        return torch.tanh(y @ W) - 3.0 * y

    def solve():
        return pnode.odeint_adjoint(f, y0, T01, method="kencarp4", adjoint_params=(W,))

    if tuple(petsc_version()[:2]) < (3, 20):
        with pytest.raises(pnode.InputError, match=r"'kencarp4' needs PETSc >= 3\.20 for its adjoint.*'beuler'"):
            solve()
        with torch.no_grad():  # forward-only solves need no adjoint
            pnode.odeint(f, y0, T01, method="kencarp4")
    else:
        (grad,) = torch.autograd.grad(solve()[-1].sum(), W)
        assert torch.isfinite(grad).all()


def test_explicit_method_out_of_steps_suggests_an_implicit_one():
    with pytest.raises(pnode.SolverError, match=r"max_num_steps.*held by stability.*method='(kencarp4|beuler)'"):
        pnode.odeint(lambda t, y: -1e4 * y, _y0(3), T01, method="dopri5", options={"max_num_steps": 20})
