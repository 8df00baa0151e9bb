"""The science examples (CNF, latent ODE, Robertson kinetics): their numerics against independent
references, short runs that must make progress, resume == uninterrupted, and ``--help``.

Every test runs with one torch thread and takes seconds; the examples' own defaults take minutes.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from problems import LinearField

import pnode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import cnf  # noqa: E402
import common  # noqa: E402
import latent_ode  # noqa: E402
import reaction_diffusion  # noqa: E402
import robertson  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # the examples set one thread themselves (--threads 1); restore the suite's setting afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(module, tmp_path, *argv):
    # "--freed-memory default": the test process keeps glibc's policy (an example would change it process-wide)
    return module.main([*argv, "--out", str(tmp_path), "--no-progress", "--freed-memory", "default"])


# ---------------------------------------------------------------------------------------------- all three
@pytest.mark.parametrize("script", ["cnf.py", "latent_ode.py", "robertson.py", "reaction_diffusion.py"])
def test_help(script):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--resume" in proc.stdout and "--out" in proc.stdout


def test_petsc_options_from_argv_reach_the_database():
    from petsc4py import PETSc

    added = common.insert_petsc_options(["--seed", "3", "-pnode_test_value", "1e-3", "-pnode_test_flag", "--out", "x"])
    try:
        assert added == {"pnode_test_value": "1e-3", "pnode_test_flag": ""}
        assert PETSc.Options().getReal("pnode_test_value") == 1e-3
        assert PETSc.Options().hasName("pnode_test_flag")
    finally:
        for name in added:
            PETSc.Options().delValue(name)


RESUME_ARGS = {
    # tiny settings; Hutchinson's trace so that the probe noise is part of the resumed random stream
    cnf: ["--data", "moons", "--batch-size", "64", "--test-size", "128", "--hidden", "16", "--trace", "hutchinson",
          "--plot-samples", "0", "--log-every", "2"],
    latent_ode: ["--n-train", "16", "--n-test", "8", "--batch-size", "8", "--n-grid", "16", "--n-obs", "5",
                 "--t-obs", "6", "--hidden", "16", "--rnn-hidden", "8", "--plot-spirals", "0", "--log-every", "2"],
    robertson: ["--n-times", "21", "--explicit-max-steps", "0", "--no-plot", "--log-every", "1"],
    reaction_diffusion: ["--batch", "4", "--grid", "32", "--n-obs", "4", "--no-plot", "--log-every", "1"],
}


@pytest.mark.parametrize("module", [cnf, latent_ode, robertson, reaction_diffusion], ids=lambda m: m.__name__)
def test_resumed_run_equals_uninterrupted_run(module, tmp_path):
    _check_resume(module, RESUME_ARGS[module], tmp_path)


def _check_resume(module, args, tmp_path):
    # Model, optimiser (Adam moments, L-BFGS history), iteration and RNG streams are checkpointed,
    # and PETSc's solves are deterministic: the resumed run must be bitwise the uninterrupted one.
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _run(module, whole, *args, "--niters", "4")
    _run(module, parts, *args, "--niters", "2")
    _run(module, parts, *args, "--niters", "4", "--resume")
    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(parts / "checkpoint.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 4
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    timing = ("elapsed", "seconds_per_iter", "peak_rss_mb")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in a["history"]]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in b["history"]]


# ---------------------------------------------------------------------------------------------- CNF
def test_cnf_exact_trace_of_a_linear_field():
    # dz/dt = A z: delta(T) = -tr(A) T exactly, z(T) = expm(A T) z0, and d delta(T)/dA = -T I per
    # sample; the last one differentiates the trace itself inside TSAdjoint (create_graph path).
    A = torch.tensor([[-0.3, 1.2], [-0.8, 0.5]], dtype=F64)
    dynamics = cnf.CNFDynamics(LinearField(A))
    z0 = torch.randn(16, 2, dtype=F64)
    T = 0.7
    z, delta = pnode.odeint_adjoint(dynamics, (z0, torch.zeros(16, 1, dtype=F64)), torch.tensor([0.0, T], dtype=F64),
                                    rtol=1e-10, atol=1e-10)
    assert torch.allclose(delta[-1], torch.full((16, 1), -float(A.trace()) * T, dtype=F64), rtol=0, atol=1e-12)
    assert torch.allclose(z[-1], z0 @ torch.linalg.matrix_exp(A * T).T, rtol=0, atol=1e-8)
    (grad,) = torch.autograd.grad(delta[-1].sum(), dynamics.net.A)
    assert torch.allclose(grad, -T * 16 * torch.eye(2, dtype=F64), rtol=0, atol=1e-9)


def _rk4_flow(net, x, steps=200):
    """The flow map t=0 -> 1 of dz/dt = net(t, z) by classic RK4 written out here (shares no code with pnode)."""
    h, z = 1.0 / steps, x
    for i in range(steps):
        t = torch.tensor(i * h, dtype=F64)
        k1 = net(t, z)
        k2 = net(t + h / 2, z + h / 2 * k1)
        k3 = net(t + h / 2, z + h / 2 * k2)
        k4 = net(t + h, z + h * k3)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z


@pytest.mark.parametrize("layer,blocks", [("concat", 1), ("concatsquash", 2)])
def test_cnf_log_prob_and_gradient_match_the_change_of_variables(layer, blocks):
    # log p(x) = log N(phi(x)) + log|det dphi/dx| with phi the composition of the blocks' flows by an
    # independent RK4 and its Jacobian from autograd; the parameter gradient of the mean log p
    # compared through the same reference.
    torch.manual_seed(1)
    nets = [cnf.VelocityField(2, 16, 2, "tanh", layer).to(F64) for _ in range(blocks)]
    model = cnf.CNF([cnf.CNFDynamics(net) for net in nets], "dopri5", rtol=1e-10, atol=1e-10)
    x = torch.randn(4, 2, dtype=F64)

    def flow(v):
        for net in nets:
            v = _rk4_flow(net, v)
        return v

    def reference_logp(x):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v).sum(0), x, create_graph=True)
        logdet = torch.stack([torch.linalg.slogdet(jac[:, i, :])[1] for i in range(x.shape[0])])
        return cnf.standard_normal_logprob(flow(x)) + logdet

    got, want = model.log_prob(x), reference_logp(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-7)
    params = [p for net in nets for p in net.parameters()]
    grads = torch.autograd.grad(got.mean(), params)
    ref_grads = torch.autograd.grad(want.mean(), params, allow_unused=True, materialize_grads=True)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)


def test_cnf_regularisers_of_a_linear_field():
    # dz/dt = A z: the Jacobian term is T |A|_F^2 per sample, exactly, with gradient 2 T A per sample;
    # the kinetic energy int_0^T |A expm(A t) z0|^2 dt by Simpson's rule on a fine grid.
    A = torch.tensor([[-0.3, 1.2], [-0.8, 0.5]], dtype=F64)
    T, z0 = 0.7, torch.randn(5, 2, dtype=F64)
    model = cnf.CNF([cnf.CNFDynamics(LinearField(A))], "dopri5", rtol=1e-11, atol=1e-11, time_length=T)
    _, regularisers = model(z0, regularize=True)
    frobenius = float((A ** 2).sum()) * T
    assert torch.allclose(regularisers[:, 1], torch.full((5,), frobenius, dtype=F64), rtol=0, atol=1e-12)
    ts = torch.linspace(0, T, 2001, dtype=F64)
    speeds = torch.stack([((z0 @ torch.linalg.matrix_exp(A * t).T) @ A.T).pow(2).sum(1) for t in ts])
    weights = torch.ones(2001, dtype=F64)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    kinetic = (weights[:, None] * speeds).sum(0) * (T / 2000) / 3
    assert torch.allclose(regularisers[:, 0], kinetic, rtol=1e-9, atol=0)
    (grad,) = torch.autograd.grad(regularisers[:, 1].sum(), model.dynamics[0].net.A)
    assert torch.allclose(grad, 2 * T * 5 * A, rtol=0, atol=1e-9)


def test_cnf_kinetic_energy_gradient_matches_finite_differences():
    A = torch.tensor([[-0.3, 1.2], [-0.8, 0.5]], dtype=F64)
    net = LinearField(A)
    model = cnf.CNF([cnf.CNFDynamics(net)], "dopri5", rtol=1e-12, atol=1e-12)
    z0 = torch.randn(3, 2, dtype=F64)
    (grad,) = torch.autograd.grad(model(z0, regularize=True)[1][:, 0].sum(), net.A)
    h = 1e-6
    with torch.no_grad():
        for i, j in [(0, 1), (1, 0)]:
            values = []
            for sign in (1, -1):
                net.A[i, j] += sign * h
                values.append(float(model(z0, regularize=True)[1][:, 0].sum()))
                net.A[i, j] -= sign * h
            assert abs((values[0] - values[1]) / (2 * h) - float(grad[i, j])) < 1e-6 * max(1.0, abs(float(grad[i, j])))


def test_hutchinson_estimate_is_unbiased_over_a_solve():
    # Each sample keeps its own probe for the whole solve, so delta_i = -int eps_i^T J eps_i dt and
    # E[delta_i] = the exact delta; the mean over many probes must agree within its standard error.
    torch.manual_seed(2)
    dynamics = cnf.CNFDynamics(cnf.VelocityField(2, 16, 2, "tanh").to(F64))
    model = cnf.CNF([dynamics], "dopri5", rtol=1e-7, atol=1e-7)
    points, copies = torch.randn(3, 2, dtype=F64), 3000
    with torch.no_grad():
        _, exact = model.blocks[0]((points, torch.zeros(3, 1, dtype=F64)))
        exact = exact[:, 0]
        for kind in ("rademacher", "gaussian"):
            x = points.repeat_interleave(copies, dim=0)
            dynamics.noise = cnf.draw_probes(kind, x.shape)
            _, delta = model.blocks[0]((x, torch.zeros(len(x), 1, dtype=F64)))
            dynamics.noise = None
            delta = delta.reshape(3, copies)
            stderr = delta.std(dim=1) / math.sqrt(copies)
            assert bool((stderr > 0).all())  # the estimator really is random here
            assert bool(((delta.mean(dim=1) - exact).abs() < 4 * stderr + 1e-6).all()), (kind, delta.mean(1), exact)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_cnf_short_training_improves_test_nll(trace, tmp_path):
    result = _run(cnf, tmp_path, "--data", "moons", "--niters", "12", "--log-every", "6", "--batch-size", "128",
                  "--test-size", "512",
                  "--hidden", "32", "--lr", "1e-2", "--trace", trace, "--plot-samples", "0")
    nll = [r["test_nll"] for r in result["history"]]
    assert len(nll) == 3
    assert nll[-1] < nll[0] - 0.2, nll
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "checkpoint.pt").exists()


def test_cnf_figure_and_sampling(tmp_path):
    result = _run(cnf, tmp_path, "--niters", "1", "--batch-size", "32", "--test-size", "64", "--hidden", "8",
                  "--plot-samples", "200", "--grid", "20", "--data", "checkerboard")
    assert os.path.getsize(result["figure"]) > 1000


def test_cnf_digits_short_training_with_regularisers(tmp_path):
    # 64 dimensions, Hutchinson's trace, two concat-squash blocks, both regularisers: a few steps
    # at toy sizes improve the exact test NLL; the log says what ran; the figure is written.
    result = _run(cnf, tmp_path, "--data", "digits", "--niters", "8", "--log-every", "4", "--batch-size", "64",
                  "--hidden", "32", "--blocks", "2", "--test-size", "48", "--lr", "1e-2", "--kinetic", "0.01",
                  "--jacobian", "0.01", "--plot-samples", "16")
    nll = [r["test_nll"] for r in result["history"]]
    assert nll[-1] < nll[0] - 1.0, nll
    assert all(r["kinetic"] > 0 and r["jacobian"] > 0 for r in result["history"][1:])
    assert set(result["baselines"]) == {"diagonal_gaussian", "full_gaussian"}
    assert os.path.getsize(result["figure"]) > 1000
    log = (tmp_path / "log.txt").read_text()
    for text in ("ODE block cnf0_: TS rk 5dp", "ODE block cnf1_: TS rk 5dp", "kinetic energy x 0.01",
                 "Jacobian Frobenius norm x 0.01 (Hutchinson)", "training trace: hutchinson",
                 "diagonal gaussian fitted to the training data"):
        assert text in log, text


def test_cnf_digits_resumed_run_equals_uninterrupted_run(tmp_path):
    _check_resume(cnf, ["--data", "digits", "--batch-size", "32", "--hidden", "16", "--blocks", "2",
                        "--test-size", "32", "--kinetic", "0.1", "--jacobian", "0.1", "--plot-samples", "0",
                        "--log-every", "2"], tmp_path)


# ---------------------------------------------------------------------------------------------- latent ODE
def _latent_setup(*extra):
    args = latent_ode.build_parser().parse_args(["--hidden", "16", "--rnn-hidden", "8", *extra])
    rng = np.random.RandomState(0)
    times = latent_ode.make_times(30, args.t_end, rng)
    data = latent_ode.make_spirals(6, times, args.t_obs, 7, args.noise_std, rng)
    return args, data, latent_ode.LatentODE(args).to(F64)


def test_latent_ode_irregular_times_are_hit_exactly():
    # The batch is solved once over the union of its observation times; each trajectory's values at
    # its own times must equal a solve over those times alone (no interpolation anywhere).
    args, data, model = _latent_setup("--rtol", "1e-10", "--atol", "1e-10")
    steps = data.times.diff()
    assert float(steps.max() - steps.min()) > 0.1  # the grid is irregular
    assert (data.observed.sum(dim=1) == 7).all() and not torch.equal(data.observed[0], data.observed[1])
    keep = data.observed.any(dim=0)
    keep[0] = True
    union = data.times[keep]
    z0 = torch.randn(6, args.latent_dim, dtype=F64)
    with torch.no_grad():
        path = model.decode_path(z0, union)
        assert path.shape == (6, len(union), 2)
        for i in range(6):
            own = data.observed[i, keep].clone()
            own[0] = True
            alone = model.decode_path(z0[i:i + 1], union[own])
            assert torch.allclose(alone[0], path[i, own], rtol=0, atol=1e-8)


def test_latent_ode_elbo_gradients_reach_every_module():
    args, data, model = _latent_setup()
    loss = latent_ode.negative_elbo(model, data, args.noise_std)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_latent_ode_short_training_reduces_the_loss(tmp_path):
    result = _run(latent_ode, tmp_path, "--n-train", "40", "--n-test", "20", "--batch-size", "20", "--n-grid", "30",
                  "--n-obs", "8", "--hidden", "16", "--rnn-hidden", "12", "--niters", "20", "--log-every", "10",
                  "--plot-spirals", "2")
    history = result["history"]
    assert [r["iteration"] for r in history] == [0, 10, 20]
    assert history[2]["neg_elbo"] < history[1]["neg_elbo"]
    assert history[2]["recon_rmse"] < history[0]["recon_rmse"]
    assert all(math.isfinite(history[2][k]) for k in ("interp_rmse", "extrap_rmse"))
    assert os.path.getsize(result["figure"]) > 1000


# ---------------------------------------------------------------------------------------------- Robertson
def _robertson_error(steps_per_interval, *extra):
    steps = [] if steps_per_interval is None else ["--steps-per-interval", str(steps_per_interval)]
    args = robertson.build_parser().parse_args([*steps, *extra])
    times = robertson.output_times(args.t_end, args.n_times)
    reference = torch.as_tensor(robertson.reference_solution(times.numpy()), dtype=F64)
    integrator = robertson.Integrator(args, times)
    with torch.no_grad():
        y = integrator.integrate(robertson.Kinetics(torch.tensor(robertson.TRUE_K, dtype=F64)))
    return float(((y - reference).abs() / reference.abs().amax(dim=0)).max())


def test_robertson_cn_matches_bdf_reference_with_second_order():
    # Errors are relative to each species' largest value. cn with 2 steps per output interval
    # (82 steps over [0, 1e5]) is within 5e-3 of SciPy's BDF at 1e-10; halving the steps again
    # divides the error by ~4 (second order), which rules out a loose Newton solve.
    coarse, fine = _robertson_error(2, "--method", "cn"), _robertson_error(4, "--method", "cn")
    assert coarse < 5e-3
    assert 3.0 < coarse / fine < 5.5, (coarse, fine)


def test_robertson_with_tolerances_alone_matches_bdf_reference():
    # the default path: kencarp4 with rtol 1e-6, atol 1e-10 and no step settings
    assert _robertson_error(None) < 1e-5


def test_robertson_fit_reduces_loss_and_dopri5_stalls(tmp_path):
    result = _run(robertson, tmp_path, "--niters", "3", "--n-times", "21", "--steps-per-interval", "2",
                  "--method", "cn", "--explicit-max-steps", "300", "--no-plot")
    losses = [r["loss"] for r in result["history"]] + [result["final_loss"]]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] / 10
    explicit = result["explicit"]
    assert not explicit["completed"] and explicit["t_reached"] < 1.0  # 300 explicit steps: not even to t=1
    # two cn steps per output interval cover [0, 1e5] (PETSc may halve the last step: MATCHSTEP)
    assert result["implicit_steps"] in (42, 43)


# ---------------------------------------------------------------------------------------------- reaction-diffusion
def test_reaction_diffusion_trains_imex_and_dopri5_needs_many_times_the_steps(tmp_path):
    result = _run(reaction_diffusion, tmp_path, "--niters", "40", "--batch", "4", "--log-every", "5", "--no-plot")
    losses = [r["loss"] for r in result["history"]] + [result["final_loss"]]
    assert losses[-1] < losses[0] / 3, losses
    steps = result["steps"]  # the trained model, same tolerances
    assert steps["dopri5"] > 8 * steps["kencarp4"], steps
