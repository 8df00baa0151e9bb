#!/usr/bin/env python
"""Weak-scaling benchmark: one training step at a fixed per-rank batch on 1 and N ranks.

Two workloads (``--workload``):

* ``odenet`` (default): the classic ODE-Net block (GroupNorm, ReLU, time-concatenated conv 3x3,
  GroupNorm, ReLU, time-concatenated conv 3x3, GroupNorm; 64 channels, 8x8 state, float32)
  integrated over [0, 1]: forward, backward, gradient averaging over the ranks and an SGD step.
  Methods: rk4 with --steps fixed steps, dopri5 with rtol = atol = --tol, cn with --steps steps
  (Newton to a relative residual of 1e-4: float32 evaluations cannot reach PETSc's default 1e-8).
* ``cnf``: the CNF example's digits flow (``examples/cnf.py``: 64 dims, one block of 2 x 256
  concat-squash layers, float64, Hutchinson's trace) and its training step (``cnf.train_step``'s
  parts: the rank's loss over its rows, backward, gradient averaging, Adam). Methods: dopri5 with
  rtol = atol = --tol, rk4 with --steps steps.

The script re-launches itself under ``mpirun -n R`` for every R in --ranks (one torch thread per
rank) and collects the time of each step (the slowest rank's); with --rounds K it runs every
configuration K times, interleaved, and reports the median over all of them.
Two data-parallel modes run on R > 1 ranks:

* ``distributed``: one PETSc system over all ranks (``ODEBlock(comm=COMM_WORLD)``): one step-size
  sequence and global norms and dot products in every step.
* ``independent``: every rank integrates its own ODE (``comm=None``); only the gradient
  averaging communicates.

Every rank uses the same --batch samples, so the global error norm, and with it dopri5's steps,
are those of one rank: the efficiency t(1 rank) / t(R ranks) measures overhead, not a different
amount of work. The CPU share (process time over wall time of the timed steps, lowest rank) tells
whether the machine was quiet: Open MPI busy-waits, so a rank below ~100 % lost its core to
another process. Prints a markdown table; ``--markdown FILE`` appends it with the command used.
PETSc options for the workers: set ``PETSC_OPTIONS`` (``PETSC_OPTIONS=-log_view``); arguments that
start with a single dash are passed on to the workers' command lines as well.
"""

import argparse
import cProfile
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

MARKER = "BENCH_SCALING_RESULT "
METHODS = {"odenet": "rk4,dopri5,cn", "cnf": "dopri5,rk4"}
DEFAULTS = {"odenet": {"batch": 32, "tol": 1e-3}, "cnf": {"batch": 256, "tol": 1e-4}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(METHODS), default="odenet",
                        help="odenet: the ODE-Net block; cnf: the CNF example's digits flow")
    parser.add_argument("--batch", type=int, help="samples per rank (odenet 32, cnf 256)")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=8, help="height and width of the state")
    parser.add_argument("--steps", type=int, default=4, help="fixed steps over [0, 1] for rk4 and cn")
    parser.add_argument("--tol", type=float, help="rtol = atol of dopri5 (odenet 1e-3, cnf 1e-4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, interleaved, so that slow drifts of the "
                             "machine's speed hit all alike; the median is over all rounds' steps")
    parser.add_argument("--methods", help="comma-separated (odenet: rk4,dopri5,cn; cnf: dopri5,rk4)")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts; the first is the baseline")
    parser.add_argument("--modes", default="distributed,independent")
    parser.add_argument("--mpirun", default=shutil.which("mpirun") or "mpirun")
    parser.add_argument("--markdown", help="append the table (and the command) to this file")
    parser.add_argument("--profile", metavar="DIR",
                        help="cProfile rank 0's timed steps into DIR/<method>-<mode>-<ranks>.prof")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "method,mode": run as one MPI rank
    args, petsc_args = parser.parse_known_args(argv)
    for key, value in DEFAULTS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = args.methods or METHODS[args.workload]
    return args, petsc_args


# ---------------------------------------------------------------- one rank
def odenet_step(args, method: str, mode: str):
    """``(train_step, block list)`` of the ODE-Net block: forward, MSE loss, backward, averaging, SGD."""
    import torch

    import pnode
    from pnode.distributed import average_gradients, broadcast_parameters, world
    from pnode.testing.networks import ODENetFunc

    options = {} if method == "dopri5" else {"step_size": 1.0 / args.steps}
    if method == "cn":
        options["snes_rtol"] = 1e-4
    torch.manual_seed(0)  # the same weights and the same samples on every rank (see the docstring)
    block = pnode.ODEBlock(ODENetFunc(args.channels), t=(0.0, 1.0), method=method, options=options,
                           rtol=args.tol, atol=args.tol, comm=world() if mode == "distributed" else None)
    broadcast_parameters(block)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    target = torch.randn_like(x)
    optimizer = torch.optim.SGD(block.parameters(), lr=1e-3)

    def train_step():
        optimizer.zero_grad()
        loss = ((block(x) - target) ** 2).mean()
        loss.backward()
        average_gradients(block.parameters())
        optimizer.step()

    return train_step, [block]


def cnf_step(args, method: str, mode: str):
    """``(train_step, blocks)`` of the CNF example's digits flow: every rank holds the same ``--batch`` rows
    (a global batch of that many rows per rank) and probes, and takes the example's training step."""
    import argparse

    import torch

    from pnode.distributed import average_gradients, broadcast_parameters, seed_everything, size, world

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import cnf
    from density_data import DigitsDensity

    seed_everything(0, per_rank=False)
    data = DigitsDensity()
    flow = argparse.Namespace(blocks=1, hidden=256, layers=2, activation="softplus", layer="concatsquash",
                              time_length=1.0, method=method, rtol=args.tol, atol=args.tol,
                              step_size=None if method == "dopri5" else 1.0 / args.steps)
    model = cnf.build_model(flow, data.dim, world() if mode == "distributed" else None)
    broadcast_parameters(model)
    x = data.batch(args.batch)
    probes = cnf.draw_probes("rademacher", x.shape)
    x, probes = x.repeat(size(), 1), probes.repeat(size(), 1)  # this rank's shard: the same rows as rank 0's
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def train_step():
        optimizer.zero_grad()
        loss, _ = cnf.local_loss(model, x, probes)
        loss.backward()
        average_gradients(model.parameters())
        optimizer.step()

    return train_step, list(model.blocks)


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    from mpi4py import MPI

    from pnode.distributed import rank, size, world

    method, mode = args.worker.split(",")
    train_step, blocks = (cnf_step if args.workload == "cnf" else odenet_step)(args, method, mode)
    mpi = world().tompi4py()
    for _ in range(args.warmup):
        train_step()
    for block in blocks:
        block.reset_nfe()
    profiler = cProfile.Profile() if args.profile and rank() == 0 else None
    times = []
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.repeats):
        mpi.Barrier()
        start = time.perf_counter()
        if profiler is not None:
            profiler.runcall(train_step)
        else:
            train_step()
        times.append(mpi.allreduce(time.perf_counter() - start, op=MPI.MAX))
    # Open MPI busy-waits, so a rank below 100 % was descheduled: the machine was not quiet.
    cpu_share = mpi.allreduce((time.process_time() - cpu) / (time.perf_counter() - wall), op=MPI.MIN)
    if profiler is not None:
        os.makedirs(args.profile, exist_ok=True)
        profiler.dump_stats(os.path.join(args.profile, f"{method}-{mode}-{size()}.prof"))
    if rank() == 0:
        nfe = [sum(getattr(b, name) for b in blocks) / args.repeats for name in ("nfe_forward", "nfe_backward")]
        result = {"method": method, "mode": mode, "ranks": size(), "batch": args.batch,
                  "median_s": statistics.median(times), "times_s": times, "cpu_share": cpu_share,
                  "nfe_forward": nfe[0], "nfe_backward": nfe[1]}
        print(MARKER + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the launcher
def launch(args, petsc_args, method: str, mode: str, ranks: int) -> dict:
    command = [args.mpirun, "-n", str(ranks)]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-run-as-root")
    command += ["-x", "OMP_NUM_THREADS", sys.executable, os.path.abspath(__file__), *_forwarded(args),
                "--worker", f"{method},{mode}", *petsc_args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise RuntimeError(f"{' '.join(command)} failed (return code {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _forwarded(args):
    forwarded = [f"--workload={args.workload}", f"--batch={args.batch}", f"--channels={args.channels}",
                 f"--size={args.size}",
                 f"--steps={args.steps}", f"--tol={args.tol}", f"--repeats={args.repeats}", f"--warmup={args.warmup}"]
    return forwarded + ([f"--profile={os.path.abspath(args.profile)}"] if args.profile else [])


def table(args, rows) -> str:
    baseline = {r["method"]: r["median_s"] for r in rows if r["ranks"] == rows[0]["ranks"]}
    if args.workload == "cnf":
        what = (f"CNF training step of the digits flow (64 dims, one block of 2 x 256 concat-squash layers, float64, "
                f"Hutchinson's trace; forward + backward + gradient averaging + Adam), batch {args.batch} per rank")
        solvers = f"rk4: {args.steps} steps; dopri5: rtol = atol = {args.tol:g}."
    else:
        what = (f"ODE-Net block training step (forward + backward + gradient averaging + SGD), "
                f"{args.channels}x{args.size}x{args.size} float32, batch {args.batch} per rank")
        solvers = f"rk4 and cn: {args.steps} steps (cn: snes_rtol 1e-4); dopri5: rtol = atol = {args.tol:g}."
    caption = (f"{what}, one torch thread per rank; median of {args.repeats} steps x {args.rounds} interleaved "
               f"round(s) (each step the slowest rank's time), after {args.warmup} warm-up step(s) per run; "
               f"t1/tN per round: from that round's own runs. {solvers}")
    header = ("| method | mode | ranks | per-rank batch | global batch | median time / step (s) "
              "| weak-scaling efficiency t1/tN | t1/tN per round: median (range) | NFE-F / NFE-B per step "
              "| CPU share (lowest rank) |")
    lines = [caption, "", header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        efficiency = baseline[r["method"]] / r["median_s"]
        paired = _paired(r, rows[0]["ranks"], rows)
        lines.append(f"| {r['method']} | {r['mode'] if r['ranks'] > 1 else '-'} | {r['ranks']} | {r['batch']} | "
                     f"{r['batch'] * r['ranks']} | {r['median_s']:.3f} | {100 * efficiency:.0f} % | {paired} | "
                     f"{r['nfe_forward']:.0f} / {r['nfe_backward']:.0f} | {100 * r['cpu_share']:.0f} % |")
    return "\n".join(lines)


def _paired(row, base_ranks: int, rows) -> str:
    """The efficiency of each round from that round's own runs (1 rank and N ranks run minutes apart at
    most, so a drift of the machine's speed between rounds cancels): median and range over rounds."""
    base = next(r for r in rows if r["method"] == row["method"] and r["ranks"] == base_ranks)
    ratios = [b / t for b, t in zip(base["round_medians"], row["round_medians"])]
    return f"{100 * statistics.median(ratios):.0f} % ({100 * min(ratios):.0f}–{100 * max(ratios):.0f} %)"


def _merge(rounds) -> dict:
    """One row from the rounds of one configuration: the median over all their timed steps."""
    times = [t for row in rounds for t in row["times_s"]]
    return {**rounds[-1], "times_s": times, "median_s": statistics.median(times),
            "round_medians": [row["median_s"] for row in rounds], "cpu_share": min(row["cpu_share"] for row in rounds)}


def main(argv=None) -> None:
    args, petsc_args = parse_args(argv)
    stray = [a for a in petsc_args if a.startswith("--")]
    if stray:
        sys.exit(f"unrecognized arguments: {' '.join(stray)} (PETSc options take one dash: -log_view)")
    if args.worker:
        worker(args)
        return
    configs = [(method, mode, n) for method in args.methods.split(",") for n in (int(r) for r in args.ranks.split(","))
               for mode in (args.modes.split(",") if n > 1 else ["distributed"])]
    load_before = os.getloadavg()[0]
    runs = {config: [] for config in configs}
    for round_number in range(args.rounds):
        for config in configs:
            row = launch(args, petsc_args, *config)
            print(f"round {round_number}: {config[0]} {config[1]} ranks={config[2]}: {row['median_s']:.3f} s/step "
                  f"(steps: {', '.join(f'{t:.3f}' for t in row['times_s'])}), CPU share {row['cpu_share']:.2f}",
                  file=sys.stderr, flush=True)
            runs[config].append(row)
    rows = [_merge(runs[config]) for config in configs]
    load_after = os.getloadavg()[0]
    text = table(args, rows) + f"\n\n1-minute load average before / after: {load_before:.2f} / {load_after:.2f}."
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(f"\n`python scripts/bench_scaling.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
                     f"\n\n{text}\n")


if __name__ == "__main__":
    main()
