"""Reproduce the thesis comparison of ResNet, ODE-Net and hybrid ("ResidualODE") classifiers.

    .venv/bin/python scripts/compare_architectures.py                       # digits, ~15-20 min on 2 cores
    .venv/bin/python scripts/compare_architectures.py --quick               # 3 configurations, a few batches
    .venv/bin/python scripts/compare_architectures.py --dataset cifar10 --epochs 50 --batch-size 200

Configurations (each trained with Adam at every ``--lrs`` value, constant lr as in the thesis):
ResNet with 1, 2, 3 residual blocks per stage; ODE-Net with forward Euler steps 0.5, 0.25, 0.1;
hybrid (residual blocks at 32 channels, ODE block at 64) with each step and 1-3 residual blocks.
Every configuration runs ``examples/cifar_odenet.py`` in its own process, one after the other, so
its peak resident memory is its own. A configuration whose results are already in ``--out`` (same
settings) is not trained again: an interrupted comparison continues where it stopped.

Writes a markdown table (best test accuracy, training time, test time per pass over the test set,
parameters, peak memory, NFE) to ``--markdown`` and the test accuracy curves to ``--png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "cifar_odenet.py")
STEPS = (0.5, 0.25, 0.1)
BLOCKS = (1, 2, 3)


@dataclass(frozen=True)
class Config:
    """One training run of the comparison."""

    arch: str
    blocks: int
    step: float | None
    lr: float

    @property
    def name(self) -> str:
        parts = [self.arch]
        if self.arch != "odenet":
            parts.append(f"{self.blocks}block")
        if self.step is not None:
            parts.append(f"step{self.step:g}")
        return "_".join(parts) + f"_lr{self.lr:g}"

    @property
    def label(self) -> str:
        blocks = f"{self.blocks} block{'s' if self.blocks > 1 else ''}"
        if self.arch == "resnet":
            return f"ResNet, {blocks}"
        if self.arch == "odenet":
            return f"ODE-Net, step {self.step:g}"
        return f"ResidualODE, step {self.step:g}, {blocks}"


def configurations(lrs: list[float], archs: list[str], quick: bool) -> list[Config]:
    if quick:
        configs = [Config("resnet", 1, None, lrs[0]), Config("odenet", 1, 0.5, lrs[0]),
                   Config("hybrid", 1, 0.5, lrs[0])]
    else:
        configs = []
        for lr in lrs:
            configs += [Config("resnet", b, None, lr) for b in BLOCKS]
            configs += [Config("odenet", 1, s, lr) for s in STEPS]
            configs += [Config("hybrid", b, s, lr) for s in STEPS for b in BLOCKS]
    return [c for c in configs if c.arch in archs]


def command(config: Config, args: argparse.Namespace, out: str) -> list[str]:
    cmd = [sys.executable, SCRIPT, "--dataset", args.dataset, "--data-dir", args.data_dir, "--arch", config.arch,
           "--blocks", str(config.blocks), "--optimizer", "adam", "--lr", str(config.lr), "--milestones",
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--threads", str(args.threads), "--out", out, "--no-progress", "--method", "euler"]
    if config.step is not None:
        cmd += ["--step-size", str(config.step)]
    if args.limit_batches:
        cmd += ["--limit-batches", str(args.limit_batches)]
    return cmd


def run_config(config: Config, args: argparse.Namespace) -> dict:
    """Train one configuration in a subprocess (or reuse its finished run); returns its results."""
    out = os.path.join(args.out, config.name)
    settings = {"config": asdict(config), "dataset": args.dataset, "epochs": args.epochs,
                "batch_size": args.batch_size, "seed": args.seed, "limit_batches": args.limit_batches}
    settings_path, summary_path = os.path.join(out, "settings.json"), os.path.join(out, "summary.json")
    if not args.force and os.path.exists(summary_path) and _read_json(settings_path) == settings:
        print(f"{config.label:<38} lr {config.lr:g}: reusing {out}", flush=True)
    else:
        os.makedirs(out, exist_ok=True)
        for stale in ("summary.json", "checkpoint.pt", "metrics.jsonl"):
            if os.path.exists(os.path.join(out, stale)):
                os.remove(os.path.join(out, stale))
        with open(settings_path, "w") as fh:
            json.dump(settings, fh)
        start = time.perf_counter()
        proc = subprocess.run(command(config, args, out), check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{config.label} lr {config.lr:g} FAILED (exit {proc.returncode}):\n{proc.stderr[-2000:]}",
                  file=sys.stderr, flush=True)
            return {"config": config, "failed": True}
        print(f"{config.label:<38} lr {config.lr:g}: best test accuracy "
              f"{_read_json(summary_path)['best_test_acc']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        history = [json.loads(line) for line in fh if line.strip()]
    return {"config": config, "failed": False, "summary": _read_json(summary_path), "history": history}


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def markdown_table(results: list[dict], args: argparse.Namespace) -> str:
    intro = (f"Dataset {args.dataset}, {args.epochs} epochs, batch {args.batch_size}, Adam (constant lr), "
             "forward Euler in the ODE blocks, PETSc discrete adjoint; times and memory on this machine "
             f"({os.cpu_count()} cores, {args.threads} torch thread(s)).")
    header = ("| architecture | lr | parameters | best test acc. | training time (s) | test time / pass (s) "
              "| peak RSS (MB) | RSS growth (MB) | NFE-F / NFE-B |")
    lines = [intro, "", header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        config = result["config"]
        if result["failed"]:
            lines.append(f"| {config.label} | {config.lr:g} | failed | | | | | | |")
            continue
        s = result["summary"]
        nfe = f"{s['nfe_forward']:.0f} / {s['nfe_backward']:.0f}" if config.arch != "resnet" else "-"
        lines.append(f"| {config.label} | {config.lr:g} | {s['params']:,} | {100 * s['best_test_acc']:.2f} % | "
                     f"{s['train_time']:.1f} | {s['test_time'] / max(s['epochs'], 1):.2f} | "
                     f"{s['peak_rss_mb']:.0f} | {s['peak_rss_mb'] - s['start_rss_mb']:.0f} | {nfe} |")
    lines += ["", ("RSS growth: peak resident memory minus the memory after loading data and building the model "
                   "(torch and PETSc alone take several hundred MB).")]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    from matplotlib.figure import Figure

    lrs = sorted({r["config"].lr for r in results}, reverse=True)
    fig = Figure(figsize=(6 * len(lrs), 4.5))
    axes = fig.subplots(1, len(lrs), squeeze=False)[0]
    # one colour map and line style per architecture, darker for later configurations of it
    styles = {"resnet": ("Blues", "-"), "odenet": ("Reds", "--"), "hybrid": ("Greens", ":")}
    for ax, lr in zip(axes, lrs):
        shown = [r for r in results if r["config"].lr == lr and not r["failed"]]
        for result in shown:
            config = result["config"]
            family = [r["config"] for r in shown if r["config"].arch == config.arch]
            cmap, style = styles[config.arch]
            shade = 0.45 + 0.5 * family.index(config) / max(len(family) - 1, 1)
            history = result["history"]
            ax.plot([r["epoch"] for r in history], [r["test_acc"] for r in history], style,
                    color=matplotlib.colormaps[cmap](shade), label=config.label)
        ax.set(title=f"Adam, lr {lr:g}", xlabel="epoch", ylabel="test accuracy")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "cifar10", "mnist"], default="digits")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per configuration (default: 10 for digits, which keeps the 30 runs "
                             "under 20 minutes on 2 cores; 50 otherwise, as in the thesis)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 for digits, 200 (thesis) otherwise")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.001])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (default: 1)")
    parser.add_argument("--out", default=os.path.join("runs", "compare"), help="one sub-directory per configuration")
    parser.add_argument("--markdown", default=None, help="markdown table (default: <out>/comparison.md)")
    parser.add_argument("--png", default=None, help="accuracy curves (default: <out>/comparison.png)")
    parser.add_argument("--archs", nargs="+", choices=["resnet", "odenet", "hybrid"],
                        default=["resnet", "odenet", "hybrid"], help="architectures to compare (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: ResNet 1 block, ODE-Net and hybrid at step 0.5, first lr, "
                             "1 epoch of 2 batches")
    parser.add_argument("--limit-batches", type=int, default=None, help="batches per epoch (smoke runs)")
    parser.add_argument("--force", action="store_true", help="retrain configurations that already finished")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else (10 if args.dataset == "digits" else 50)
    if args.batch_size is None:
        args.batch_size = 128 if args.dataset == "digits" else 200
    if args.quick and args.limit_batches is None:
        args.limit_batches = 2
    args.markdown = args.markdown or os.path.join(args.out, "comparison.md")
    args.png = args.png or os.path.join(args.out, "comparison.png")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    results = [run_config(config, args) for config in configurations(args.lrs, args.archs, args.quick)]
    table = markdown_table(results, args)
    print("\n" + table)
    for path in (args.markdown, args.png):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(args.markdown, "w") as fh:
        fh.write(table)
    plot(results, args.png)
    print(f"table: {args.markdown}; curves: {args.png}; total {time.perf_counter() - start:.0f} s")
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
