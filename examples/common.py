"""Small helpers shared by pnode's example scripts: arguments, logging, progress, checkpoints, memory.

Every example accepts PETSc options on its command line (``-ts_type cn -ts_trajectory_type memory``):
argparse ignores them (``parse_known_args``) and PETSc reads them from ``sys.argv`` when pnode is
imported. Under ``mpirun`` only rank 0 logs, shows progress bars and writes checkpoints.
"""

import argparse
import json
import logging
import os
import random
import resource
import sys
import time
from typing import Any, Dict, Iterable, Optional

import numpy as np
import torch

from pnode import allocator, distributed


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments every example shares (run directory, resume, seed, threads, progress)."""
    group = parser.add_argument_group("run")
    group.add_argument("--out", default=None, help="run directory for logs, checkpoints and figures")
    group.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if it exists")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--threads", type=int, default=0,
                       help="torch threads per process (0: torch's default; 1 per rank under mpirun)")
    group.add_argument("--no-progress", action="store_true", help="disable progress bars")
    group.add_argument("--freed-memory", choices=["keep", "return", "default"], default="keep",
                       help="glibc's policy for freed memory (pnode.allocator): keep it for the next training "
                            "step (default: faster on the CPU, same peak), return it at once (resident memory "
                            "follows live memory, for a tight -pnode_memory_budget), or leave glibc's default")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse known arguments, reject unknown ``--`` ones, and hand ``-ts_*``-style options to PETSc.

    The PETSc options of ``argv`` (default ``sys.argv[1:]``) go into PETSc's options database
    (:func:`insert_petsc_options`), so that ``-ts_type cn`` reaches the ODE blocks also when
    ``main(argv)`` is called from Python.
    """
    args, unknown = parser.parse_known_args(argv)
    stray = [a for a in unknown if a.startswith("--")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (PETSc options take one dash: -ts_type cn)")
    insert_petsc_options(argv)
    return args


def setup_run(args: argparse.Namespace, name: str) -> logging.Logger:
    """Create the run directory, seed everything (per rank), set threads, return a rank-0 logger."""
    rank, size = distributed.rank(), distributed.size()
    if args.out is None:
        args.out = os.path.join("runs", name)
    if args.threads or size > 1:
        torch.set_num_threads(args.threads or 1)
    asked = getattr(args, "freed_memory", "default")  # scripts without add_common_args leave it alone
    policy = {"keep": allocator.keep_freed_memory, "return": allocator.return_freed_memory}.get(asked)
    applied = policy() if policy is not None else False
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(args.out, "log.txt"))):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.info("command: %s", " ".join(sys.argv))
        policy_text = (f"{asked} (pnode.allocator)" if applied else "the C allocator's default policy"
                       + ("" if asked == "default" else f" ('{asked}' needs glibc)"))
        logger.info("ranks: %d, torch threads: %d, freed memory: %s", size, torch.get_num_threads(), policy_text)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def progress(iterable: Iterable, desc: str = "", enabled: bool = True, total: Optional[int] = None):
    """A tqdm progress bar on rank 0 (plain iteration elsewhere or when disabled)."""
    if not enabled or distributed.rank() != 0:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write ``state`` with torch.save atomically (temp file + rename), on rank 0 only."""
    if distributed.rank() != 0:
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``path`` (every rank reads it), or None if there is none."""
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch RNG states, so a resumed run continues the same random stream."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def append_jsonl(path: str, record: Dict[str, Any]) -> None:
    """Append one JSON record per line (metrics history), on rank 0 only."""
    if distributed.rank() != 0:
        return
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def insert_petsc_options(argv=None) -> Dict[str, str]:
    """Copy the PETSc options in ``argv`` (default ``sys.argv[1:]``) into PETSc's options database.

    ``-ts_type cn -ts_monitor -ksp_rtol 1e-10``: a one-dash name, optionally followed by a value.
    pnode initialises PETSc with ``sys.argv``, but a ``main(argv)`` called from Python passes its
    own list, so the examples insert the options themselves; call this before the first solve.
    Options already in the database are left as they are. Returns what was added.
    """
    import pnode

    pnode.init()  # PETSc reads sys.argv, as at any first solve
    from petsc4py import PETSc

    tokens = list(sys.argv[1:] if argv is None else argv)
    db, added = PETSc.Options(), {}
    for i, token in enumerate(tokens):
        if not token.startswith("-") or token.startswith("--") or len(token) < 2 or _is_number(token):
            continue
        value = tokens[i + 1] if i + 1 < len(tokens) else ""
        if value.startswith("-") and not _is_number(value):
            value = ""
        name = token[1:]
        if not db.hasName(name):
            db.setValue(name, value)
            added[name] = value
    return added


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
