import os
import sys
from contextlib import contextmanager

import pytest
import torch

from pnode._compat import PETSc

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextmanager
def command_line(**options):
    """PETSc options set in its database (as if on the command line) within the block, removed after."""
    db = PETSc.Options()
    for key, value in options.items():
        db.setValue(key, value)
    try:
        yield
    finally:
        for key in options:
            db.delValue(key)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def zero_weight_ok():
    from pnode._impl.adjoint import zero_weight_param_gradients_ok

    return zero_weight_param_gradients_ok()


def skip_if_zero_weight_broken(method):
    """Skip where pnode refuses zero-weight methods: PETSc sums the parameter gradient (no exported
    RK tableau) and its RK adjoint gets zero-weight stages wrong (PETSc 3.18)."""
    from pnode._impl.methods import resolve_method

    if resolve_method(method).zero_weight_stage and not zero_weight_ok():
        pytest.skip(f"{method}: this PETSc's RK adjoint mishandles zero-weight stages (pnode raises instead)")


class CheckpointSpy:
    """Records each checkpointed adjoint pnode runs, to read its counters afterwards.

    ``runs``: the ``CheckpointedAdjoint`` objects, in order; ``stored``: for each, the steps whose
    states its store held when the reverse pass began.
    """

    def __init__(self, monkeypatch):
        from pnode._impl import checkpoint

        self.runs, self.stored = [], []
        original = checkpoint.CheckpointedAdjoint.run

        def run(adjoint, record, store, grad):
            self.runs.append(adjoint)
            self.stored.append(sorted(store.states))
            return original(adjoint, record, store, grad)

        monkeypatch.setattr(checkpoint.CheckpointedAdjoint, "run", run)
