"""PETSc options: precedence between pnode's method, options={...}, the command line and prefixes.

Precedence (highest first): prefixed command line > unprefixed command line > options={...} >
method/step settings. The command line is simulated by inserting into PETSc's options database.
"""


import pytest
import torch
from conftest import command_line, rel_err

import pnode
from pnode._compat import PETSc
from pnode._impl.odeint import odeint_reported
from pnode._impl.stats import SolveStats
from pnode.testing.references import TABLEAUS, rk_solve

T = torch.tensor([0.0, 1.0], dtype=torch.float64)


def field(t, y):
    return torch.sin(y) - 0.3 * y


def solve(method="rk4", options=None, prefix=None):
    y0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    opts = {"step_size": 0.25, **(options or {})}
    block = pnode.ODEBlock(field, t=(0.0, 1.0), method=method, options=opts, prefix=prefix)
    return block(y0)


def reference(method):
    y0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    return rk_solve(field, y0, [0.0, 1.0], 0.25, TABLEAUS[method])[-1]


def test_method_argument_alone():
    assert rel_err(solve("rk4"), reference("rk4")) < 1e-14
    assert rel_err(solve("midpoint"), reference("midpoint")) < 1e-14


def test_options_dict_overrides_method():
    assert rel_err(solve("rk4", {"ts_rk_type": "1fe"}), reference("euler")) < 1e-14


def test_command_line_overrides_options_dict():
    with command_line(ts_rk_type="2b"):
        assert rel_err(solve("rk4", {"ts_rk_type": "1fe"}), reference("midpoint")) < 1e-14


def test_unprefixed_command_line_reaches_prefixed_solvers():
    with command_line(ts_rk_type="2b"):
        assert rel_err(solve("rk4", prefix="blk_a_"), reference("midpoint")) < 1e-14


def test_prefixed_command_line_overrides_unprefixed_and_only_its_block():
    with command_line(ts_rk_type="2b", blk_b_ts_rk_type="1fe"):
        assert rel_err(solve("rk4", prefix="blk_b_"), reference("euler")) < 1e-14
        assert rel_err(solve("rk4", prefix="blk_c_"), reference("midpoint")) < 1e-14


def test_command_line_can_switch_to_an_implicit_method():
    # -ts_type beuler replaces the script's rk4; backward Euler differs from every RK reference.
    with command_line(blk_d_ts_type="beuler"):
        y = solve("rk4", prefix="blk_d_")
    assert rel_err(y, reference("rk4")) > 1e-3
    y_be = solve("beuler", prefix="blk_e_")
    assert rel_err(y, y_be) < 1e-8


def test_options_do_not_leak_between_solvers():
    solve("rk4", {"ts_rk_type": "1fe"})
    assert not PETSc.Options().hasName("ts_rk_type")
    assert rel_err(solve("rk4"), reference("rk4")) < 1e-14


def test_theta_option():
    y0 = torch.linspace(-1, 1, 4, dtype=torch.float64)
    lam = -2.0
    h = 0.1
    opts = {"step_size": h, "theta": 0.7, "ts_theta_endpoint": True, "ksp_rtol": 1e-14, "snes_rtol": 1e-14}
    y = pnode.odeint(lambda t, y: lam * y, y0, T, method="theta", options=opts)[-1]
    growth = (1 + (1 - 0.7) * h * lam) / (1 - 0.7 * h * lam)
    assert rel_err(y, y0 * growth**10) < 1e-12


@pytest.mark.parametrize("traj", [{"ts_trajectory_type": "memory"},
                                  {"ts_trajectory_type": "memory", "ts_trajectory_solution_only": True}])
def test_trajectory_options_keep_gradients(traj):
    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return torch.tanh(y @ W)

    ys = pnode.odeint_adjoint(f, y0, T, method="rk4", options={"step_size": 0.1, **traj}, adjoint_params=(W,))
    got = torch.autograd.grad(ys[-1].sum(), (y0, W))
    ref = rk_solve(f, y0, [0.0, 1.0], 0.1, TABLEAUS["rk4"])
    want = torch.autograd.grad(ref[-1].sum(), (y0, W))
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-10


def test_flag_options_take_none_or_true(capfd):
    # {'ts_monitor': None} is PETSc's bare flag -ts_monitor; True is 'true'
    y0 = torch.ones(2, dtype=torch.float64)
    pnode.odeint(lambda t, y: -y, y0, T, method="cn", options={"step_size": 0.5, "ts_monitor": None,
                                                              "snes_monitor": None, "ts_adapt_monitor": True})
    out = capfd.readouterr().out
    assert "TS dt 0.5 time 0.5" in out and "SNES Function norm" in out


def test_available_methods_split_into_adaptive_and_fixed_step_ones():
    adaptive, fixed = pnode.available_methods(adaptive=True), pnode.available_methods(adaptive=False)
    assert sorted(adaptive + fixed) == sorted(pnode.available_methods()) and not set(adaptive) & set(fixed)
    assert {"dopri5", "bosh3", "kencarp4", "cn", "rk:5dp"} <= set(adaptive)
    assert {"euler", "rk4", "implicit_euler", "trapezoid", "rk:4"} <= set(fixed)
    # adaptive: an error-controlled solve takes more steps at a tighter tolerance; fixed: the same steps
    for name, expect_more in (("dopri5", True), ("rk4", False)):
        steps = []
        for rtol in (1e-3, 1e-9):
            stats = SolveStats()
            odeint_reported(lambda t, y: -y, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 2.0]),
                            rtol=rtol, atol=rtol, method=name, stats=stats)
            steps.append(stats.steps)
        assert (steps[1] > steps[0]) == expect_more, (name, steps)


def test_a_prefixed_block_keeps_its_trajectory_where_the_options_say():
    # PETSc creates a TS's trajectory without the TS's prefix: the default -<prefix>ts_trajectory_type
    # memory went unread and every prefixed block stored its steps in files (PETSc's 'basic').
    y0 = torch.linspace(-1, 1, 6, dtype=torch.float64, requires_grad=True)
    for prefix in (None, "blk_traj_"):
        block = pnode.ODEBlock(field, t=(0.0, 1.0), method="rk4", options={"step_size": 0.25}, prefix=prefix)
        block(y0).sum().backward()
        assert block.stats.solver["ts_trajectory_type"] == "memory", prefix


def test_prefixed_trajectory_options_reach_the_trajectory(tmp_path):
    directory = tmp_path / "steps"
    y0 = torch.linspace(-1, 1, 6, dtype=torch.float64, requires_grad=True)
    block = pnode.ODEBlock(field, t=(0.0, 1.0), method="rk4", prefix="blk_disk_", options={"step_size": 0.25})
    with command_line(blk_disk_ts_trajectory_type="basic", blk_disk_ts_trajectory_dirname=str(directory),
                      blk_disk_ts_trajectory_keep_files=True):
        y = block(y0)
        (grad,) = torch.autograd.grad(y.sum(), y0)
    assert block.stats.solver["ts_trajectory_type"] == "basic"
    # one file (and its .info) for the state at t = 0 and after each of the 4 steps
    assert sorted(p.name for p in directory.glob("*.bin")) == [f"TS-{i:06d}.bin" for i in range(5)]
    want = pnode.ODEBlock(field, t=(0.0, 1.0), method="rk4", options={"step_size": 0.25})(y0)
    assert rel_err(grad, torch.autograd.grad(want.sum(), y0)[0]) < 1e-13


def test_the_command_line_does_not_change_pnode_s_own_probe_of_petsc():
    # The probe of PETSc's zero-weight-stage adjoint solves one midpoint step; with -ts_type cn on the
    # command line it solved cn instead, failed, and refused every dopri5 script run with -ts_type cn.
    from pnode._impl.adjoint import zero_weight_param_gradients_ok

    zero_weight_param_gradients_ok.cache_clear()
    want = zero_weight_param_gradients_ok()
    zero_weight_param_gradients_ok.cache_clear()
    with command_line(ts_type="cn"):
        assert zero_weight_param_gradients_ok() == want
    assert not PETSc.Options().hasName("ts_type")  # the command line is given back as it was
    if not want:
        pytest.skip("this PETSc drops zero-weight stages' parameter gradients: dopri5 is refused anyway")
    y0 = torch.tensor([1.0, -1.0], dtype=torch.float64)

    def gradient(method):
        torch.manual_seed(0)
        net = torch.nn.Linear(2, 2).double()
        block = pnode.ODEBlock(lambda t, y: torch.tanh(net(y)), t=(0.0, 1.0), method=method,
                               options={"step_size": 0.25})
        block.net = net  # a submodule: its parameters are the block's
        (grad,) = torch.autograd.grad(block(y0).sum(), net.weight)
        return grad, block.stats.solver["ts_type"]

    with command_line(ts_type="cn"):
        got, ran = gradient("dopri5")
    ref, _ = gradient("cn")
    assert ran == "cn" and rel_err(got, ref) < 1e-8
