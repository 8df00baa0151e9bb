"""The tensor <-> PETSc Vec bridge: state layout, dtype casts and device staging, in one place.

PETSc works on one flat vector of real scalars (float64 by default; float32 in a single-precision
build). A user state is a tensor of any shape, or a tuple of tensors; :class:`StateLayout` maps
between the two.
Reading a Vec gives a zero-copy CPU view; tensors of another dtype or on a CUDA device are cast or
staged through the host at this boundary and nowhere else.
"""

import functools
import warnings
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np
import torch

from ._compat import PETSc


@functools.lru_cache(maxsize=None)
def petsc_dtype() -> torch.dtype:
    """The torch dtype matching PETSc's scalar (``torch.float64`` for a default real build)."""
    return torch.from_numpy(np.zeros(1, dtype=PETSc.ScalarType)).dtype


@functools.lru_cache(maxsize=None)
def petsc_eps() -> float:
    """Machine epsilon of PETSc's real type (2.2e-16 in a default build, 1.2e-7 with ``--with-precision=single``).

    PETSc keeps times in this type too, so time comparisons and round-off tolerances scale with it.
    """
    return float(np.finfo(PETSc.RealType).eps)

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class StateLayout:
    """Shapes of the tensors that make up one state, and how they pack into a flat vector.

    Attributes:
        shapes: shape of each tensor of the state (one entry for a plain tensor state).
        is_tuple: whether the user passed a tuple (so results are returned as a tuple).
        dtype: the user's floating dtype (all tensors of a state share it).
        device: the user's device.
    """

    shapes: Tuple[torch.Size, ...]
    is_tuple: bool
    dtype: torch.dtype
    device: torch.device

    @property
    def sizes(self) -> Tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, state: State) -> torch.Tensor:
        """Concatenate a state into a 1-D tensor of ``numel`` entries (user dtype and device)."""
        parts = state if self.is_tuple else (state,)
        if len(parts) == 1:
            return parts[0].reshape(-1)
        return torch.cat([p.reshape(-1) for p in parts])

    def unflatten(self, flat: torch.Tensor) -> State:
        """Split a 1-D tensor (or ``(..., numel)`` tensor) back into the state's shapes.

        Shapes are passed to ``reshape`` as one tuple, so 0-dim states (``shape == ()``) come back
        0-dim (``reshape()`` with no arguments is an error).
        """
        lead = tuple(flat.shape[:-1])
        if not self.is_tuple:
            return flat.reshape(lead + tuple(self.shapes[0]))
        parts = torch.split(flat, self.sizes, dim=-1)
        return tuple(p.reshape(lead + tuple(s)) for p, s in zip(parts, self.shapes))


def layout_of(state: State) -> StateLayout:
    """The :class:`StateLayout` of a tensor or tuple of tensors (validated by the caller)."""
    is_tuple = isinstance(state, (tuple, list))
    parts: Sequence[torch.Tensor] = tuple(state) if is_tuple else (state,)
    return StateLayout(tuple(p.shape for p in parts), is_tuple, parts[0].dtype, parts[0].device)


_READ_ONLY_WARNING_SEEN = False


def vec_view(vec) -> torch.Tensor:
    """A CPU tensor that shares memory with the local part of ``vec`` (no copy).

    Valid while ``vec`` lives and its storage is not replaced; callers copy what they keep.
    """
    global _READ_ONLY_WARNING_SEEN
    array = vec.getArray(readonly=True)
    if _READ_ONLY_WARNING_SEEN:
        return torch.from_numpy(array)
    # PETSc hands out a read-only NumPy view, which pnode never writes through. torch warns about
    # such arrays once per process: silence that once (catching warnings costs more than the view).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        view = torch.from_numpy(array)
    _READ_ONLY_WARNING_SEEN = True
    return view


def vec_to_tensor(vec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The local part of ``vec`` as a new tensor of ``dtype`` on ``device`` (always a copy)."""
    view = vec_view(vec)
    if view.dtype == dtype and device.type == "cpu":
        return view.clone()
    return view.to(device=device, dtype=dtype, non_blocking=False)


def vec_key(vec) -> Tuple[int, int]:
    """``(address, state)`` of a Vec: equal keys mean the same Vec with unchanged contents.

    PETSc raises an object's state on every change made through its API; pnode's own writes go
    through :func:`writable_view`, which raises it too. Comparing keys replaces comparing (or
    copying) whole vectors when pnode checks that PETSc asks about a point it has seen before.
    """
    return vec.handle, vec.stateGet()


def writable_view(vec) -> torch.Tensor:
    """A CPU tensor sharing memory with the local part of ``vec``, for writing.

    petsc4py's writable ``getArray`` does not raise the Vec's state; this does, so that PETSc's
    cached norms and :func:`vec_key` see the write. Write right away, before PETSc touches ``vec``.
    """
    array = vec.getArray()
    vec.stateIncrease()
    return torch.from_numpy(array)


def tensor_into_vec(tensor: torch.Tensor, vec) -> None:
    """Write a 1-D tensor (any dtype, any device) into the local part of ``vec`` (cast on the way)."""
    writable_view(vec).copy_(tensor.detach().reshape(-1))


def tensor_to_petsc_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a contiguous CPU tensor of PETSc's scalar dtype (no copy when it already is one)."""
    return tensor.detach().to(device="cpu", dtype=petsc_dtype()).contiguous()
