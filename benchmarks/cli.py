"""What the benchmark entry points share: their common options, row selection, and the results document."""

import argparse
import fnmatch
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from importlib import metadata
from typing import Dict, List, Optional, Sequence

from benchmarks import report
from benchmarks.measure import Row, Settings
from benchmarks.workloads import WORKLOADS

QUICK = {"warmup": 1, "repeats": 1, "memory_steps": 1, "timeout_s": 300.0}
"""What ``--quick`` measures: one step of each kind (the workloads' toy sizes too)."""


def int_list(text: str) -> List[int]:
    """'4,16,64' -> [4, 16, 64] (an argparse type)."""
    return [int(value) for value in text.split(",") if value]


def new_parser(description: str, default_out: str = "bench-results") -> argparse.ArgumentParser:
    """An entry point's parser with the options every entry point has."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes (batch 8), one warm-up, one timed and one memory step: a smoke run")
    parser.add_argument("--rows", nargs="+", metavar="PATTERN",
                        help="run only the rows whose id matches one of these shell patterns (see --list)")
    parser.add_argument("--list", action="store_true", help="print the ids of the rows and exit")
    parser.add_argument("--out", default=default_out, help=f"directory for the JSON, markdown and figures "
                                                           f"(default {default_out})")
    parser.add_argument("--repeats", type=int, help="timed training steps per row, the median counts (default 5)")
    parser.add_argument("--rounds", type=int,
                        help="measure the times of every row this many times, a row after another, and take the "
                             "median over all rounds: the machine's drift reaches every row alike (default 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch intra-op threads (default: all CPUs)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="every row, torchdiffeq's too, first calls pnode.allocator.keep_freed_memory()")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="every row, torchdiffeq's too, first calls pnode.allocator.return_freed_memory() "
                             "(resident memory follows live memory; the memory-budget rows always do)")
    parser.add_argument("--no-grad-check", action="store_true", help="skip the gradient errors")
    parser.add_argument("--timeout", type=float, help="seconds a row may take (default 3600; --quick: 300)")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    values: Dict[str, object] = dict(QUICK) if args.quick else {}
    values.update(quick=args.quick, threads=args.threads, keep_freed_memory=args.keep_freed_memory,
                  return_freed_memory=args.return_freed_memory,
                  grad_check=not args.no_grad_check)
    if args.repeats is not None:
        values["repeats"] = args.repeats
    if args.rounds is not None:
        if args.rounds < 1:
            raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
        values["rounds"] = args.rounds
    if args.timeout is not None:
        values["timeout_s"] = args.timeout
    return Settings(**values)


def matches(row_id: str, patterns: Optional[Sequence[str]]) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(row_id, pattern) for pattern in patterns)


def select(rows: Sequence[Row], patterns: Optional[Sequence[str]]) -> List[Row]:
    """The rows whose id matches a pattern (all of them without patterns)."""
    return [row for row in rows if matches(row.id, patterns)]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
                        platform.machine())
    except OSError:
        return platform.machine()


def machine() -> Dict[str, object]:
    """The machine and the versions of what the rows run."""
    versions = {}
    for package in ("torch", "petsc4py", "torchdiffeq", "pnode"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(), **versions}


def document(benchmark: str, settings: Settings, entries: List[Dict[str, object]],
             argv: Sequence[str]) -> Dict[str, object]:
    """The results document that the report renders (written as JSON)."""
    used = sorted({entry["workload"] for entry in entries})
    return {"benchmark": benchmark, "command": f"python -m benchmarks.{benchmark} {shlex.join(argv)}".rstrip(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "settings": asdict(settings),
            "workloads": {name: WORKLOADS[name].describe(settings.quick) for name in used}, "rows": entries}


def listed(args: argparse.Namespace, rows: Sequence[Row]) -> bool:
    """With ``--list``, print the ids of ``rows`` and say so."""
    if args.list:
        print("\n".join(row.id for row in rows))
    return args.list


def finish(benchmark: str, settings: Settings, entries: List[Dict[str, object]], argv: Sequence[str],
           out_dir: str) -> None:
    """Write a run's results document, render it, and print its markdown."""
    print(report.write(document(benchmark, settings, entries, argv), out_dir, benchmark))


def save(doc: Dict[str, object], markdown: str, out_dir: str, stem: str) -> None:
    """Write ``<stem>.json`` (the results document) and ``<stem>.md`` (its markdown) to ``out_dir``; print
    the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    with open(os.path.join(out_dir, stem + ".md"), "w") as fh:
        fh.write(markdown)
    print(markdown)


def arguments(argv: Optional[Sequence[str]]) -> List[str]:
    return list(sys.argv[1:] if argv is None else argv)
