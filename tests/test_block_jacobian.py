"""The per-sample block-Jacobian preconditioner: its blocks against autograd's Jacobian, the implicit
steps and gradients it gives against the exactly solved steps (also when func couples the samples,
which the blocks then only approximate), and how it is chosen."""


import pytest
import torch
from conftest import command_line, rel_err
from problems import LinearField, MLPField, stable_matrix

import pnode
from pnode._impl.block_jacobian import BLOCK_LIMIT, BlockLayout, block_layout, default_jacobian, jacobian_blocks
from pnode._impl.bridge import layout_of
from pnode._impl.odeint import odeint_adjoint_reported, odeint_reported
from pnode._impl.rhs import RHS
from pnode.testing.references import theta_linear_solve, theta_newton_solve

F64 = torch.float64


def test_blocks_are_the_per_sample_jacobians():
    torch.manual_seed(0)
    func = MLPField(dim=5, hidden=7).double()
    y = torch.randn(4, 5, dtype=F64)
    rhs = RHS(func, layout_of(y), (), 1.0)
    blocks = jacobian_blocks(rhs.linearize(0.3, y.reshape(-1)), block_layout(rhs.layout))
    full = torch.autograd.functional.jacobian(lambda v: func(torch.tensor(0.3, dtype=F64), v.reshape(4, 5)).reshape(-1),
                                              y.reshape(-1))
    assert blocks.shape == (4, 5, 5)
    for b in range(4):
        assert torch.allclose(blocks[b], full[5 * b:5 * b + 5, 5 * b:5 * b + 5], rtol=0, atol=1e-14)


def test_block_layout_follows_the_batch_dimension():
    assert block_layout(layout_of(torch.zeros(8, 3, 2))) == BlockLayout(8, 6)
    assert block_layout(layout_of(torch.zeros(3))) == BlockLayout(1, 3)  # no batch: one block, the whole Jacobian
    assert block_layout(layout_of((torch.zeros(2, 3), torch.zeros(2)))) == BlockLayout(1, 8)  # a tuple: one block
    assert default_jacobian(layout_of(torch.zeros(256, 8)), implicit=True) == "blocks"
    assert default_jacobian(layout_of(torch.zeros(2, BLOCK_LIMIT + 1)), implicit=True) == "matrix_free"
    assert default_jacobian(layout_of(torch.zeros(256, 8)), implicit=False) == "matrix_free"


@pytest.mark.parametrize("method,theta", [("cn", 0.5), ("beuler", 1.0)])
def test_blocks_give_exact_newton_steps_and_gradients(method, theta):
    """One LU solve per Newton iteration (preonly), iterations shared within a step; the steps and the
    gradients equal autograd through the same steps solved by Newton to round-off."""
    torch.manual_seed(1)
    func = MLPField(dim=4, hidden=8).double()
    y0 = torch.randn(3, 4, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    stats = pnode._impl.stats.SolveStats()
    options = {"step_size": 0.2, "snes_rtol": 1e-13, "snes_stol": 1e-15}
    ys = odeint_adjoint_reported(func, y0, t, method=method, options=options, stats=stats)
    assert stats.solver["pc_type"] == "blocks" and stats.solver["ksp_type"] == "preonly"
    assert stats.krylov_iterations == stats.newton_iterations
    ref = theta_newton_solve(func, y0, t.tolist(), 0.2, theta, newton_iters=8)
    assert rel_err(ys, ref) < 1e-13
    w = torch.randn_like(ref)
    inputs = (y0, *func.parameters())
    for got, want in zip(torch.autograd.grad((ys * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        assert rel_err(got, want) < 1e-12


def test_a_func_that_couples_samples_still_gets_exact_gradients():
    """dy/dt = y A^T - mean over the batch: the per-sample blocks miss the coupling. Newton converges
    anyway (more iterations); the adjoint's GMRES, preconditioned by the blocks, solves the transposed
    systems to its tolerance, so the gradient is the exact one."""
    torch.manual_seed(2)
    A = stable_matrix(3) * 5
    field = LinearField(A)

    def coupled(t, y):
        return field(t, y) - 2.0 * y.mean(dim=0, keepdim=True)

    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    options = {"step_size": 0.25, "snes_rtol": 1e-14, "snes_stol": 1e-16, "snes_max_it": 50}
    ys = pnode.odeint_adjoint(coupled, y0, t, method="beuler", options=options, adjoint_params=(field.A,))
    # the whole system as one linear ODE on the flat state: block diagonal A, plus the batch mean
    whole = torch.kron(torch.eye(4, dtype=F64), field.A) - 2.0 * torch.kron(torch.ones(4, 4, dtype=F64) / 4,
                                                                            torch.eye(3, dtype=F64))
    ref = theta_linear_solve(whole, y0.reshape(1, 12), t.tolist(), 0.25, 1.0).reshape(2, 4, 3)
    assert rel_err(ys, ref) < 1e-12
    w = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad((ys * w).sum(), (y0, field.A)),
                         torch.autograd.grad((ref * w).sum(), (y0, field.A))):
        assert rel_err(got, want) < 1e-10


def test_krylov_options_make_gmres_iterate_with_the_blocks():
    func = MLPField(dim=3).double()
    stats = pnode._impl.stats.SolveStats()
    with torch.no_grad():
        odeint_reported(func, torch.randn(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="cn",
                     options={"step_size": 0.5, "ksp_rtol": 1e-10}, stats=stats)
    assert stats.solver["ksp_type"] == "gmres" and stats.solver["pc_type"] == "blocks"


def test_the_choice_is_an_option_and_a_command_line_flag():
    func = MLPField(dim=3).double()
    y0, t = torch.randn(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    stats = pnode._impl.stats.SolveStats()
    with torch.no_grad():
        odeint_reported(func, y0, t, method="cn", options={"jacobian": "matrix_free"}, stats=stats)
        assert stats.solver["pc_type"] == "none" and stats.solver["ksp_type"] == "gmres"
        with command_line(pnode_jacobian="matrix_free"):
            odeint_reported(func, y0, t, method="cn", options={"jacobian": "blocks"}, stats=stats)
        assert stats.solver["pc_type"] == "none"
    with pytest.raises(pnode.InputError, match=r"options\['jacobian'\] must be 'blocks'.*or 'matrix_free'.*'dense'"):
        pnode.odeint(func, y0, t, method="cn", options={"jacobian": "dense"})
