"""pnode on a GPU: PETSc's vectors on the state's device, results equal to the CPU path's.

Skipped without a GPU or without a PETSc built with CUDA (``PNODE_CUDA=1 VENV=.venv-cuda bash
scripts/setup.sh``; on a lent GPU machine ``scripts/gpu_check.sh`` brings one, see docs/gpu.md).

The CPU path is the reference: the same network and inputs, moved to the host. The two differ by the
rounding of each operation (a GPU's reductions, matrix products and fused kernels round differently),
carried through a few dozen steps of a contractive network: a few hundred ulps of the dtype, so the
bounds below are 1e-12 relative in float64 and 1e-4 in float32 (ulp 1.2e-7). The steps an adaptive
method takes are the same on both: the error norms that choose them differ by round-off only.
"""

import json
import os
import tempfile

import pytest
import torch
from problems import solve_case

import pnode

CUDA = torch.cuda.is_available()


def _petsc_has_cuda() -> bool:
    from pnode._compat import petsc_has_cuda

    return petsc_has_cuda()


pytestmark = pytest.mark.skipif(not CUDA or not _petsc_has_cuda(),
                                reason="needs a GPU and a PETSc built with CUDA (docs/gpu.md)")

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-4}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def _net(dtype, device):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 6))
    return net.to(device=device, dtype=dtype)


def _run(case, dtype, device):
    """Outputs and gradients (y0, parameters), flat, of one solve of ``case`` on ``device``."""
    net = _net(dtype, device)
    torch.manual_seed(2)
    y0 = torch.randn(64, 6, dtype=dtype).to(device).requires_grad_(True)
    return solve_case(case, net, y0, torch.tensor([0.0, 0.5, 1.0], dtype=dtype, device=device))


CASES = [
    ("rk4", {"step_size": 0.05}, "odeint_adjoint"),
    ("rk4", {"step_size": 0.05}, "odeint"),
    ("dopri5", {}, "odeint_adjoint"),
    ("dopri5", {}, "odeint"),
    ("bosh3", {"checkpoints": 3}, "odeint_adjoint"),
    ("cn", {"step_size": 0.1}, "odeint_adjoint"),
    ("beuler", {"step_size": 0.1}, "odeint_adjoint"),
    ("tuple", {}, "odeint_adjoint"),
    ("event", {}, "odeint_adjoint"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{'-'.join(map(str, c[1].values()))}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cuda_solves_and_gradients_equal_the_cpu_path(case, dtype):
    on_gpu = _run(case, dtype, torch.device("cuda"))
    on_cpu = _run(case, dtype, torch.device("cpu"))
    for got, want in zip(on_gpu, on_cpu):
        assert got.device.type == "cuda"
        assert _relative(got, want) < TOLERANCE[dtype]


def test_every_petsc_vector_of_a_cuda_solve_is_on_the_gpu():
    from pnode._impl.adjoint import solve_forward
    from pnode._impl.bridge import vec_view
    from pnode._impl.pool import release_solver
    from pnode._impl.problem import check_inputs

    y0 = torch.randn(8, 3, device="cuda", dtype=torch.float64)
    problem = check_inputs(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]), 1e-7, 1e-9, "dopri5", None, None)
    key, solver, record = solve_forward(problem, (), record=False)
    try:
        assert solver.device == y0.device
        assert "cuda" in solver.solution.getType()
        assert vec_view(solver.solution).device == y0.device
        assert solver.jacobian.getVecType() == "cuda"
        assert record.outputs.device == y0.device
    finally:
        release_solver(key, solver)


def test_a_solve_inside_another_torch_stream_equals_one_on_the_default_stream():
    net = _net(torch.float64, "cuda")
    y0 = torch.randn(256, 6, device="cuda", dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    expected = pnode.odeint(lambda t, y: net(y), y0, t, method="rk4", options={"step_size": 0.05})
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = pnode.odeint(lambda t, y: net(y), y0, t, method="rk4", options={"step_size": 0.05})
    torch.cuda.synchronize()
    assert torch.equal(got, expected)


def test_dense_output_of_a_cuda_solve_is_on_its_device():
    y0 = torch.randn(16, 2, device="cuda", dtype=torch.float64)
    solution = pnode.odeint_dense(lambda t, y: -y, y0, 0.0, 1.0, method="dopri5")
    values = solution(torch.tensor([0.25, 0.5]))
    assert values.device == y0.device
    assert _relative(values[-1], y0 * torch.exp(torch.tensor(-0.5))) < 1e-5


# ------------------------------------------------------------------ host <-> device copies per solve
def _host_device_copies(run, min_bytes: int) -> int:
    """Copies between host and device of at least ``min_bytes`` made while ``run()`` runs, PETSc's
    included (CUDA's activity trace sees every library's), read from the profiler's trace."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy"]
    sized = [e for e in copies if "bytes" in e.get("args", {})]
    assert len(sized) == len(copies), "the profiler's trace gives no sizes of copies: cannot tell a scalar from a state"
    return sum(1 for e in sized if ("HtoD" in e["name"] or "DtoH" in e["name"]) and e["args"]["bytes"] >= min_bytes)


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_host_device_copies_per_solve_do_not_grow_with_the_stages(interface, dtype):
    net = _net(dtype, "cuda")
    params = tuple(net.parameters())
    y0 = torch.randn(2048, 6, device="cuda", dtype=dtype)  # 12288 entries: a state copy is >= 48 kB
    odeint = getattr(pnode, interface)
    extra = {} if interface == "odeint" else {"adjoint_params": params}

    def training_step(steps: int):
        def run():
            y = y0.detach().requires_grad_(True)
            ys = odeint(lambda t, y: net(y), y, torch.tensor([0.0, 1.0], dtype=dtype), method="rk4",
                        options={"step_size": 1.0 / steps}, **extra)
            ys[-1].square().sum().backward()
        return run

    training_step(4)()  # the solvers and torch's kernels set up once
    training_step(32)()
    few, many = (_host_device_copies(training_step(n), min_bytes=4096) for n in (4, 32))
    assert many == few <= 2, f"host<->device copies of 4 kB or more: {few} with 4 steps, {many} with 32"
