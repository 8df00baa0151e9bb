"""The tensor <-> PETSc Vec bridge: state layout, dtype casts and where vectors live, in one place.

PETSc works on one flat vector of real scalars (float64 by default; float32 in a single-precision
build). A user state is a tensor of any shape, or a tuple of tensors; :class:`StateLayout` maps
between the two.

A solve's PETSc vectors live on one device (:func:`vec_device`): on the state's GPU when the state
is on CUDA and PETSc was built with CUDA (CUDA Vecs, shared with torch through DLPack), else on the
host (a CUDA state is then staged through host memory at this boundary, with a warning). How a
Vec's data is seen as a tensor, and how a write is declared to PETSc, is a :class:`VecAccess`:
:data:`HOST` for CPU Vecs, :data:`DEVICE` for CUDA Vecs (PETSc's host/device offload mask kept
right); :func:`vec_view`, :func:`writable_view` and :func:`tensor_into_vec` pick it per Vec. Tensors
of another dtype are cast on the vectors' device.
"""

import functools
import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import ContextManager, Dict, Iterator, List, Protocol, Sequence, Tuple, Union

import numpy as np
import torch

from .._compat import PETSc, petsc_has_cuda
from .errors import InputError


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


CPU = torch.device("cpu")
_STAGING_WARNED = False


def choose_vec_device(state_device: torch.device, petsc_cuda: bool, cuda_available: bool) -> torch.device:
    """Where a solve's PETSc vectors live for a state on ``state_device`` (the decision alone).

    On the state's GPU when the state is on CUDA, PETSc was built with CUDA and torch sees a GPU
    (creating a CUDA Vec without one aborts the process, it does not raise); on the host otherwise.
    """
    if state_device.type == "cuda" and petsc_cuda and cuda_available:
        index = state_device.index if state_device.index is not None else torch.cuda.current_device()
        return torch.device("cuda", index)
    return CPU


def vec_device(state_device: torch.device) -> torch.device:
    """:func:`choose_vec_device` for this process's PETSc and torch; warns once when a CUDA state is
    staged through the host because PETSc has no CUDA."""
    if state_device.type != "cuda":
        return CPU
    device = choose_vec_device(state_device, petsc_has_cuda(), torch.cuda.is_available())
    if device.type == "cpu":
        _warn_staging()
    return device


def _warn_staging() -> None:
    global _STAGING_WARNED
    if not _STAGING_WARNED:
        _STAGING_WARNED = True
        warnings.warn("the state is on CUDA but this PETSc was built without CUDA: every stage is copied to the "
                      "host and back. Build PETSc with CUDA to keep PETSc's vectors on the GPU: "
                      "PNODE_CUDA=1 VENV=.venv-cuda bash scripts/setup.sh (see docs/gpu.md)", stacklevel=4)


def create_vec(local_size: int, comm, device: torch.device):
    """A PETSc Vec of ``local_size`` entries on this rank over ``comm``, on ``device``'s memory.

    CPU: a host MPI Vec. CUDA: a CUDA Vec (VECSEQCUDA on one rank, VECMPICUDA on several: one GPU
    per rank), allocated by PETSc on the GPU PETSc uses on this rank (see :func:`check_vec_device`).
    """
    if device.type == "cpu":
        return PETSc.Vec().createMPI((local_size, PETSc.DECIDE), comm=comm)
    vec = PETSc.Vec().create(comm=comm)
    vec.setSizes((local_size, PETSc.DECIDE))
    vec.setType("cuda")
    return vec


def place_operator(mat, device: torch.device) -> None:
    """Make the vectors PETSc creates for shell matrix ``mat`` (Krylov and Newton work vectors) live on
    ``device`` (``MatSetVecType``; a MATPYTHON shell makes host vectors unless told)."""
    if device.type == "cuda":
        mat.setVecType("cuda")


def check_vec_device(vec, device: torch.device) -> None:
    """Raise when PETSc put ``vec`` on another device than ``device`` (the state's GPU).

    PETSc uses one GPU per rank, chosen when it initialises (rank modulo the GPUs, ``LOCAL_RANK``
    under torchrun, or ``-device_select <n>``).
    """
    seen = vec_view(vec).device
    if seen != device:
        raise InputError(f"the state is on {device} but PETSc keeps its vectors on {seen} in this process: "
                         f"put the state on {seen}, or start the program with -device_select {device.index} "
                         f"(or CUDA_VISIBLE_DEVICES) so that PETSc uses {device}")


def to_petsc(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` as a contiguous tensor of PETSc's scalar dtype on ``device`` (no copy when it already is one)."""
    return tensor.detach().to(device=device, dtype=petsc_dtype()).contiguous()


@contextmanager
def _device_stream_order(device: torch.device) -> Iterator[None]:
    """torch's work on ``device``'s default stream within the block, ordered with the caller's stream.

    PETSc's default device context launches on CUDA's default stream. torch does too unless the
    caller runs in another stream, where PETSc's kernels and torch's could overlap on the same
    vectors; then the block waits for the caller's stream, runs on the default one, and the caller's
    stream waits for the block.
    """
    current, default = torch.cuda.current_stream(device), torch.cuda.default_stream(device)
    if current == default:
        yield
        return
    default.wait_stream(current)
    with torch.cuda.stream(default):
        yield
    current.wait_stream(default)


def stream_order(device: torch.device) -> ContextManager[None]:
    """Order torch's work with PETSc's on ``device`` for a solve (nothing to order on the CPU)."""
    return nullcontext() if device.type == "cpu" else _device_stream_order(device)


class VecAccess(Protocol):
    """How pnode sees the local data of a Vec as a tensor, and declares its writes to PETSc.

    Attributes:
        cached: a view stays valid for a whole PETSc call (PETSc never moves the data meanwhile, and no
            other copy of it can become the current one), so :func:`cached_views` may keep it.
    """

    cached: bool

    def read(self, vec) -> torch.Tensor:
        """A tensor sharing memory with the local part of ``vec`` (PETSc's dtype, ``(n,)``), read only.

        Valid until PETSc next changes ``vec``; callers copy what they keep.
        """

    def write(self, vec, keep: bool) -> torch.Tensor:
        """Like :meth:`read`, for writing: PETSc is told that ``vec`` changes (its state rises, so cached
        norms and :func:`vec_key` see it) and where its current data will be. ``keep``: the write
        updates the contents (``add_``) rather than replacing them all. Write right away, before PETSc
        touches ``vec`` again.
        """


class _HostAccess:
    """CPU Vecs: NumPy views of host memory (petsc4py's ``getArray``), valid for a whole PETSc call."""

    cached = True

    def read(self, vec) -> torch.Tensor:
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

    def write(self, vec, keep: bool) -> torch.Tensor:
        vec.stateIncrease()  # petsc4py's writable getArray does not raise the state
        return torch.from_numpy(vec.getArray())


class _DeviceAccess:
    """CUDA Vecs: DLPack views of device memory (``Vec.toDLPack``), taken at each access, never cached.

    A CUDA Vec has a host and a device copy; PETSc's offload mask says which is current. A view is
    taken through PETSc's get/restore of the device array in the access's mode, which keeps the mask
    right: ``'r'`` first brings the device copy up to date if only the host copy is (PETSc rarely
    touches it), ``'w'`` makes the device copy the current one and raises the state, ``'rw'`` does
    both. Caching a view across PETSc's work would miss a host update, and a write through it would
    leave the mask stale; a view holds a reference to its Vec (the Vec outlives it).
    """

    cached = False

    def read(self, vec) -> torch.Tensor:
        return torch.from_dlpack(vec.toDLPack("r"))

    def write(self, vec, keep: bool) -> torch.Tensor:
        return torch.from_dlpack(vec.toDLPack("rw" if keep else "w"))


HOST: VecAccess = _HostAccess()
DEVICE: VecAccess = _DeviceAccess()


def access_of(vec) -> VecAccess:
    """The :class:`VecAccess` of ``vec``: :data:`DEVICE` for CUDA Vecs, else :data:`HOST`."""
    return DEVICE if "cuda" in vec.getType() else HOST


_READ_ONLY_WARNING_SEEN = False
# Views of the Vecs a PETSc call hands to pnode's callbacks, by the Vec's address (petsc4py 3.18 has
# no object ids to key by), one dict for reading and one for writing per call in progress (see
# cached_views). A cached host view keeps its Vec alive (petsc4py's array holds a reference to the
# Vec), so no other Vec can take a cached address while the block lasts.
_VIEW_CACHES: List[Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]] = []


@contextmanager
def cached_views() -> Iterator[None]:
    """Within the block, :func:`vec_view` and :func:`writable_view` take each host Vec's array once.

    A solve's callbacks see the same few Vecs (the state, the stages, the work vectors) hundreds of
    times; getting an array costs a petsc4py call and a tensor, about 5 us, a dict lookup far less.
    The arrays stay taken until the block ends (PETSc's CPU Vecs keep their storage meanwhile; no
    pnode code keeps a view beyond a callback, it copies what it keeps). CUDA Vecs are viewed afresh
    at each access (:class:`VecAccess`).
    """
    _VIEW_CACHES.append(({}, {}))
    try:
        yield
    finally:
        _VIEW_CACHES.pop()


def vec_view(vec) -> torch.Tensor:
    """A tensor that shares memory with the local part of ``vec`` (no copy), on the Vec's device.

    Valid while ``vec`` lives and its storage is not replaced; callers copy what they keep.
    """
    if _VIEW_CACHES:
        reads = _VIEW_CACHES[-1][0]
        key = vec.handle
        view = reads.get(key)
        if view is None:
            access = access_of(vec)
            view = access.read(vec)
            if access.cached:
                reads[key] = view
        return view
    return access_of(vec).read(vec)


def vec_to_tensor(vec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The local part of ``vec`` as a new tensor of ``dtype`` on ``device`` (always a copy)."""
    view = vec_view(vec)
    if view.dtype == dtype and view.device == device:
        return view.clone()
    return view.to(device=device, dtype=dtype, non_blocking=False)


def vec_key(vec) -> Tuple[int, int]:
    """``(address, state)`` of a Vec: equal keys mean the same Vec with unchanged contents.

    PETSc raises an object's state on every change made through its API; pnode's own writes go
    through :func:`writable_view`, which raises it too. Comparing keys replaces comparing (or
    copying) whole vectors when pnode checks that PETSc asks about a point it has seen before.
    """
    return vec.handle, vec.stateGet()


def writable_view(vec, keep: bool = False) -> torch.Tensor:
    """A tensor sharing memory with the local part of ``vec``, for writing (see :meth:`VecAccess.write`).

    ``keep``: the write updates the contents rather than replacing them all. Write right away,
    before PETSc touches ``vec``.
    """
    if _VIEW_CACHES:
        writes = _VIEW_CACHES[-1][1]
        key = vec.handle
        view = writes.get(key)
        if view is not None:
            vec.stateIncrease()
            return view
        access = access_of(vec)
        view = access.write(vec, keep)
        if access.cached:
            writes[key] = view
        return view
    return access_of(vec).write(vec, keep)


def tensor_into_vec(tensor: torch.Tensor, vec) -> None:
    """Write a 1-D tensor (any dtype, any device) into the local part of ``vec`` (cast on the way)."""
    writable_view(vec).copy_(tensor.detach().reshape(-1))
