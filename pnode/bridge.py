"""The tensor <-> PETSc Vec bridge: state layout, dtype casts and device staging, in one place.

PETSc works on one flat vector of real scalars (float64 by default; float32 in a single-precision
build). A user state is a tensor of any shape, or a tuple of tensors; :class:`StateLayout` maps
between the two.
Reading a Vec gives a zero-copy CPU view; tensors of another dtype or on a CUDA device are cast or
staged through the host at this boundary and nowhere else.
"""

import functools
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple, Union

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
    sizes: Tuple[int, ...] = field(init=False, compare=False, repr=False)
    numel: int = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        # computed once: every evaluation of f unflattens the state and flattens its output
        sizes = tuple(math.prod(s) for s in self.shapes)
        object.__setattr__(self, "shapes", tuple(tuple(s) for s in self.shapes))
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "numel", sum(sizes))

    def flatten(self, state: State) -> torch.Tensor:
        """Concatenate a state into a 1-D tensor of ``numel`` entries (user dtype and device)."""
        if not self.is_tuple:
            return state.reshape(-1)
        if len(state) == 1:
            return state[0].reshape(-1)
        return torch.cat([p.reshape(-1) for p in state])

    def unflatten(self, flat: torch.Tensor) -> State:
        """Split a 1-D tensor (or ``(..., numel)`` tensor) back into the state's shapes.

        Shapes are passed to ``reshape`` as one tuple, so 0-dim states (``shape == ()``) come back
        0-dim (``reshape()`` with no arguments is an error).
        """
        if flat.dim() == 1:
            if not self.is_tuple:
                return flat.reshape(self.shapes[0])
            return tuple(p.reshape(s) for p, s in zip(torch.split(flat, self.sizes), self.shapes))
        lead = tuple(flat.shape[:-1])
        if not self.is_tuple:
            return flat.reshape(lead + self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=-1)
        return tuple(p.reshape(lead + s) for p, s in zip(parts, self.shapes))


def layout_of(state: State) -> StateLayout:
    """The :class:`StateLayout` of a tensor or tuple of tensors (validated by the caller)."""
    is_tuple = isinstance(state, (tuple, list))
    parts: Sequence[torch.Tensor] = tuple(state) if is_tuple else (state,)
    return StateLayout(tuple(p.shape for p in parts), is_tuple, parts[0].dtype, parts[0].device)


_READ_ONLY_WARNING_SEEN = False
# Views of the Vecs a PETSc call hands to pnode's callbacks, by the Vec's address, one dict for
# reading and one for writing per call in progress (see cached_views), and the Vecs themselves: a
# held reference keeps a Vec alive, so no other Vec can take its address while the block lasts
# (petsc4py 3.18 has no object ids to key by).
_VIEW_CACHES: List[Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor], List[object]]] = []


@contextmanager
def cached_views() -> Iterator[None]:
    """Within the block, :func:`vec_view` and :func:`writable_view` take each Vec's array once.

    A solve's callbacks see the same few Vecs (the state, the stages, the work vectors) hundreds of
    times; getting an array costs a petsc4py call and a tensor, about 5 us, a dict lookup far less.
    The arrays stay taken until the block ends (PETSc's CPU Vecs keep their storage meanwhile; no
    pnode code keeps a view beyond a callback, it copies what it keeps).
    """
    _VIEW_CACHES.append(({}, {}, []))
    try:
        yield
    finally:
        _VIEW_CACHES.pop()


def vec_view(vec) -> torch.Tensor:
    """A CPU tensor that shares memory with the local part of ``vec`` (no copy).

    Valid while ``vec`` lives and its storage is not replaced; callers copy what they keep.
    """
    if _VIEW_CACHES:
        reads, _, held = _VIEW_CACHES[-1]
        key = vec.handle
        view = reads.get(key)
        if view is None:
            view = reads[key] = _read_view(vec)
            held.append(vec)
        return view
    return _read_view(vec)


def _read_view(vec) -> torch.Tensor:
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
    vec.stateIncrease()
    if _VIEW_CACHES:
        _, writes, held = _VIEW_CACHES[-1]
        key = vec.handle
        view = writes.get(key)
        if view is None:
            view = writes[key] = torch.from_numpy(vec.getArray())
            held.append(vec)
        return view
    return torch.from_numpy(vec.getArray())


def tensor_into_vec(tensor: torch.Tensor, vec) -> None:
    """Write a 1-D tensor (any dtype, any device) into the local part of ``vec`` (cast on the way)."""
    writable_view(vec).copy_(tensor.detach().reshape(-1))


def tensor_to_petsc_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a contiguous CPU tensor of PETSc's scalar dtype (no copy when it already is one)."""
    return tensor.detach().to(device="cpu", dtype=petsc_dtype()).contiguous()
