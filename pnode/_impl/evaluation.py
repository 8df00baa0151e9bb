"""How one solve evaluates and linearises f: plain evaluations, kept stage graphs, and their lookup.

PETSc calls the right-hand side and its Jacobians through :class:`pnode._impl.solver.Solver`; what a call
does there is decided by the values of this module that the call carries:

* :class:`Evaluator`: how each evaluation of f is done (without a graph, or keeping the graph
  for a later VJP in a :class:`GraphStore`; a replayed FSAL step's first derivative given);
* :class:`GraphStore`: the kept graphs of one solve, found again by stage time and state;
* :class:`StageTimes`: the times f was evaluated at in a forward pass, so that the adjoint
  linearises f at exactly those times (PETSc's adjoint recomputes them, an ulp away);
* :class:`Linearizer`: the linearization the Jacobian shells use at a point: the current one, a
  kept graph, or a new one.
"""

import bisect
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .bridge import petsc_eps, tensor_into_vec, vec_key, vec_view
from .rhs import RHS, Linearization, same_stage_time, stage_time_tolerance

# Relative distance, in round-off units of f's arithmetic, within which a re-taken stage is the
# forward pass's stage (a step size an ulp off, carried through a few stages).
_ROUND_OFF_ULPS = 1000.0
# Entries of a state compared first, to tell another stage at the same time apart cheaply.
_SAMPLE = 4096
# Lookups remembered by point (a step's stages, and some).
_RECENT_HITS = 32


def _relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (0 when equal)."""
    return float((a - b).norm()) / max(float(b.norm()), 1e-300)


class GraphStore:
    """Stage graphs kept by a forward pass (or a re-taken step) for the adjoint's VJPs.

    Args:
        limit: keep at most the ``limit`` latest graphs (each new one drops the oldest: the
            adjoint reverses stages last to first, so it uses the latest first); None: no limit.
        max_bytes: keep at most this many bytes of graphs, dropping the oldest; None: no limit.
        exact: find a graph only at its own state (bit for bit in the user's dtype), never at the
            nearest one: for lookups at stored stages, which are exact. A store that drops graphs
            needs it: with the right graph gone, the nearest could be another stage at the same
            time (rk4's two at ``t + h/2`` lie within round-off tolerance of each other for small h).
        measured: the bytes of the first ``measured`` graphs are measured (a saved-tensors hook
            sees every tensor a graph saves); every later graph is taken to cost their mean. The
            graphs of one network at one state size are alike, and the hook costs a Python call per
            saved tensor, which on a small state is a tenth of an evaluation.

    Attributes:
        held_bytes: bytes the kept graphs hold (saved activations plus stage inputs and outputs).
        built_bytes: bytes of every graph built into the store, kept or dropped since.
        built: graphs built into the store.
    """

    def __init__(self, limit: Optional[int] = None, max_bytes: Optional[int] = None, exact: bool = False,
                 measured: int = 8):
        self.limit = limit
        self.max_bytes = max_bytes
        self.exact = exact
        self.measured = measured
        # oldest first; the n-th graph built has serial n, and only the oldest is ever dropped, so the
        # graph of serial s is graphs[s - first serial kept]
        self.graphs: List[Linearization] = []
        self.held_bytes = self.built_bytes = self.built = 0
        # (stage time, serial) of every kept graph, sorted: a lookup bisects to the few graphs at
        # its stage time instead of scanning them all (a solve keeps hundreds)
        self._times: List[Tuple[float, int]] = []
        self._hits: "OrderedDict[tuple, int]" = OrderedDict()  # (tau, Vec key) -> serial, recent lookups
        self._cursor: Optional[int] = None  # serial of the graph found last

    def __len__(self) -> int:
        return len(self.graphs)

    def make_room(self) -> None:
        """Drop the oldest graphs so that one more fits under the count limit (before building it)."""
        while self.limit is not None and self.graphs and len(self.graphs) >= self.limit:
            self._drop_oldest()

    def _graph(self, serial: int) -> Optional[Linearization]:
        """The kept graph of ``serial``, or None once it was dropped."""
        i = serial - (self.built - len(self.graphs))
        return self.graphs[i] if 0 <= i < len(self.graphs) else None

    def measuring(self) -> bool:
        """Whether the next graph built into the store should have its bytes measured."""
        return self.built < self.measured

    def add(self, lin: Linearization) -> None:
        """Keep ``lin`` (built with measured bytes while :meth:`measuring`), dropping the oldest graphs
        beyond the byte limit."""
        if not self.measuring():
            lin.graph_bytes = self.built_bytes // max(self.built, 1)
        self.graphs.append(lin)
        bisect.insort(self._times, (float(lin.tau), self.built))
        self.held_bytes += lin.graph_bytes
        self.built_bytes += lin.graph_bytes
        self.built += 1
        while self.max_bytes is not None and self.graphs and self.held_bytes > self.max_bytes:
            self._drop_oldest()

    def drop_newest(self, count: int) -> None:
        """Drop the ``count`` latest graphs (a step PETSc rolled back); the next one built takes the
        first serial freed."""
        for _ in range(min(count, len(self.graphs))):
            lin = self.graphs.pop()
            self.built -= 1
            del self._times[bisect.bisect_left(self._times, (float(lin.tau), self.built))]
            self.held_bytes -= lin.graph_bytes
            self.built_bytes -= lin.graph_bytes
        self._hits.clear()
        self._cursor = None

    def _drop_oldest(self) -> Linearization:
        serial = self.built - len(self.graphs)
        lin = self.graphs.pop(0)
        del self._times[bisect.bisect_left(self._times, (float(lin.tau), serial))]
        self.held_bytes -= lin.graph_bytes
        return lin

    def find(self, rhs: RHS, tau: float, u: torch.Tensor, key) -> Optional[Linearization]:
        """The kept graph at ``(tau, u)``, or None (see :meth:`_locate`).

        It stays in the store: an FSAL method's first stage is the previous step's last, whose
        value PETSc's re-take of that step asks for again (its graph, once used, is freed).
        """
        return self._locate(rhs, tau, u, key)

    def value_at(self, rhs: RHS, tau: float, u: torch.Tensor, key) -> Optional[torch.Tensor]:
        """f at ``(tau, u)`` from a kept graph (its output, detached), leaving the graph in place."""
        lin = self._locate(rhs, tau, u, key)
        return None if lin is None else lin.value

    def _at_stage_time(self, tau: float) -> List[Tuple[Linearization, int]]:
        """(graph, serial) of the kept graphs at stage time ``tau`` (up to round-off), latest first."""
        width = stage_time_tolerance(tau)
        lo = bisect.bisect_left(self._times, (tau - width, -1))
        hi = bisect.bisect_right(self._times, (tau + width, self.built))
        return [(self._graph(serial), serial) for _, serial in sorted(self._times[lo:hi], key=lambda e: -e[1])]

    def _locate(self, rhs: RHS, tau: float, u: torch.Tensor, key) -> Optional[Linearization]:
        """The graph at ``(tau, u)``: the same point (latest first), else the nearest graph at the same
        stage time whose state lies within round-off of ``u``.

        PETSc re-takes a step from a solution-only trajectory with the difference of two recorded
        times as its size, which can be an ulp off the size it took: the re-taken stages then lie a
        few ulps from the forward pass's. They are the same stages, and the adjoint must use the
        forward pass's graphs for them (which makes the gradient that of the steps taken).
        A lookup at the point of a recent one (PETSc evaluates a re-taken step's stages, then asks
        for their Jacobians at the unchanged Vecs) gives the same graph without comparing states.
        """
        if key is not None and (tau, key) in self._hits:
            lin = self._graph(self._hits[tau, key])
            if lin is not None:
                return lin
        found = self._next_back(rhs, tau, u, key) or self._nearest(rhs, float(tau), u, key)
        if found is not None and key is not None:
            self._hits[tau, key] = found[1]
            while len(self._hits) > _RECENT_HITS:
                self._hits.popitem(last=False)
        if found is not None:
            self._cursor = found[1]
        return None if found is None else found[0]

    def _next_back(self, rhs: RHS, tau: float, u: torch.Tensor, key) -> Optional[Tuple[Linearization, int]]:
        """The graph just before the last one found, or the one before it, when it is at ``(tau, u)``
        exactly: an adjoint goes back through the stages in the order they were built (an FSAL
        method's last stage has no request), so this finds most without searching. A graph built
        at the same stage Vec and at exactly the same time is that stage (restored by the
        trajectory, or re-taken at the step size taken); at a time within round-off only, the
        state is compared: a step shorter than the round-off window would put the next step's
        stage there too. An ``exact`` store, whose right graph may be gone, always compares."""
        if self._cursor is None:
            return None
        user = None
        for serial in (self._cursor - 1, self._cursor - 2):
            lin = self._graph(serial)
            if lin is None or not same_stage_time(lin.tau, tau):
                continue
            if key is not None and key == lin.key:
                return lin, serial
            if (not self.exact and lin.tau == tau and key is not None and lin.key is not None
                    and key[0] == lin.key[0]):
                return lin, serial
            user = rhs.to_user(u) if user is None else user
            if torch.equal(lin.u, user):
                return lin, serial
        return None

    def _nearest(self, rhs: RHS, tau: float, u: torch.Tensor, key) -> Optional[Tuple[Linearization, int]]:
        """(graph, serial) for :meth:`_locate`, or None. A graph of another stage at the same time is
        told apart on a strided sample of the state first (thousands of entries, not the whole)."""
        tolerance = _ROUND_OFF_ULPS * max(petsc_eps(), float(torch.finfo(rhs.layout.dtype).eps))
        near, best = None, tolerance
        stride = max(1, u.numel() // _SAMPLE)
        sample = user = None
        for lin, serial in self._at_stage_time(tau):
            if key is not None and key == lin.key:
                return lin, serial
            sample = rhs.to_user(u[::stride]) if sample is None else sample
            if stride > 1 and _relative_distance(lin.u[::stride], sample) > tolerance:
                continue  # another stage: off on the sample already (a miss only costs a new evaluation)
            if user is None:
                user = sample if stride == 1 else rhs.to_user(u)
            if torch.equal(lin.u, user):  # a re-take with the step sizes of the forward pass
                return lin, serial
            if self.exact:
                continue
            distance = _relative_distance(lin.u, user)
            if distance < best:
                near, best = (lin, serial), distance
        return near

    def clear(self) -> None:
        self.graphs, self._times, self._hits = [], [], OrderedDict()
        self.held_bytes, self._cursor = 0, None


class StageTimes:
    """The PETSc times a forward pass evaluated f at, by the address of the stage Vec, and step ends."""

    def __init__(self):
        self.by_vec: Dict[int, List[float]] = {}
        self.step_ends: List[float] = []
        self._sorted: Optional[Dict[object, List[float]]] = None

    def add(self, address: int, tau: float) -> None:
        self.by_vec.setdefault(address, []).append(tau)
        self._sorted = None

    def remove_last(self, address: int) -> None:
        """Forget the latest time recorded at the stage Vec at ``address`` (a step rolled back)."""
        self.by_vec[address].pop()
        self._sorted = None

    def forward_time(self, tau: float, address: int) -> float:
        """The forward pass's time for the adjoint's stage time ``tau`` at the stage Vec at ``address``.

        PETSc's RK adjoint recomputes a stage time as ``t_end - (1 - c_i) h``, which can round an
        ulp away from the forward's ``t + c_i h``; f is linearised at the time it was evaluated at,
        so that a time-dependent f gets the same gradient from a stored and from a re-taken step.
        The times evaluated at the same stage Vec come first (two stages can lie an ulp apart:
        dopri5's two with c = 1 in a float32 PETSc), then the step ends (an FSAL step's first
        stage, which reused the previous step's last evaluation, was evaluated at none: a re-taken
        step evaluates it at its start), then any forward time.
        """
        if self._sorted is None:  # once per adjoint pass: the forward pass added every time before it
            every = [t for times in self.by_vec.values() for t in times]
            self._sorted = {key: sorted(set(times)) for key, times in
                            [*self.by_vec.items(), ("steps", self.step_ends), ("every", every)]}
        for key in (address, "steps", "every"):
            nearest = _nearest(self._sorted.get(key), tau)
            if nearest is not None and same_stage_time(nearest, tau):
                return nearest
        return tau


def _nearest(sorted_times: Optional[List[float]], tau: float) -> Optional[float]:
    """The entry of ``sorted_times`` nearest to ``tau`` (None when there is none)."""
    if not sorted_times:
        return None
    i = bisect.bisect_left(sorted_times, tau)
    if i == 0:
        return sorted_times[0]
    if i == len(sorted_times):
        return sorted_times[-1]
    before, after = sorted_times[i - 1], sorted_times[i]
    return before if tau - before <= after - tau else after


Observer = Callable[[object, float, object, object], None]


class Evaluator:
    """How one solve evaluates f at PETSc's request (the right-hand-side callback).

    Args:
        rhs: the right-hand side of this call.
        graphs: keep each evaluation's graph here (None: evaluate without a graph).
        graph_stages: keep graphs of the first ``graph_stages`` evaluations of each step only
            (an FSAL method's adjoint never linearises its last stage); None: all.
        graphs_from_step: keep graphs from this step on only (0: the first step is step 0); earlier
            steps evaluate without one (a budget that keeps the graphs of the last steps builds no
            graph it would drop).
        first_derivative: the derivative the first evaluation writes instead of f (a re-taken
            FSAL step starts from the one the original step reused; its graph is still built).
        cached: kept graphs whose outputs serve evaluations at their points (PETSc re-taking a
            step to recover its stages for the adjoint evaluates f where the forward pass did).
        observer: called as ``observer(ts, tau, u, last_output)`` before each evaluation, with the
            Vec the previous evaluation wrote (the forward pass records step sizes, stage times and
            FSAL reuse there).
    """

    def __init__(self, rhs: RHS, graphs: Optional[GraphStore] = None, graph_stages: Optional[int] = None,
                 first_derivative: Optional[torch.Tensor] = None, cached: Optional[GraphStore] = None,
                 observer: Optional[Observer] = None, graphs_from_step: int = 0):
        self.rhs = rhs
        self.graphs = graphs
        self.graph_stages = graph_stages
        self.graphs_from_step = graphs_from_step
        self.steps_started = 0
        self.first_derivative = first_derivative
        self.cached = cached
        self.observer = observer
        self.stage = 0
        self.last_output = None  # the Vec the latest evaluation was written into
        self._last = None  # (tau, Vec key of the point, value) of the latest evaluation
        self._step_graphs = 0  # graphs kept by the step in progress

    def step_started(self) -> None:
        self.stage = 0
        self.steps_started += 1
        self._step_graphs = 0

    def discard_step(self) -> None:
        """Forget the step in progress (PETSc rolled it back): its kept graphs and its count."""
        if self._step_graphs:
            self.graphs.drop_newest(self._step_graphs)
        self._step_graphs = self.stage = 0
        self.steps_started -= 1
        self._last = None

    def _keeps_graph(self, stage: int) -> bool:
        """Whether this evaluation (``stage`` of the current step) keeps its graph."""
        return (self.graphs is not None and (self.graph_stages is None or stage < self.graph_stages)
                and self.steps_started > self.graphs_from_step)

    def evaluate(self, ts, tau: float, u, f) -> None:
        """Write f at ``(tau, u)`` into ``f`` (Vecs), as this call evaluates it."""
        if self.observer is not None:
            self.observer(ts, tau, u, self.last_output)
        given, self.first_derivative = self.first_derivative, None
        stage, self.stage = self.stage, self.stage + 1
        view, key = vec_view(u), vec_key(u)
        if self.cached is not None and given is None:
            given = self.cached.value_at(self.rhs, tau, view, key)
        if self._keeps_graph(stage):
            self.graphs.make_room()  # before the new graph is built: at most the limit at once
            value, lin = self.rhs.evaluate_linearized(tau, view, key, forward=self.observer is not None,
                                                      measure=self.graphs.measuring())
            self.graphs.add(lin)
            self._step_graphs += 1
            given = value if given is None else given
        elif given is None:
            given = self.rhs.evaluate(tau, view)
        tensor_into_vec(given, f)
        self.last_output = f
        self._last = (tau, key, given)

    def last_value_at(self, tau: float) -> Optional[torch.Tensor]:
        """The latest evaluation's value (user dtype) if it was at time ``tau``, else None."""
        return self._last[2] if self._last is not None and self._last[0] == tau else None

    def value_at(self, tau: float, key) -> Optional[torch.Tensor]:
        """The latest evaluation's value (user dtype) if it was at ``(tau, key)``, else None."""
        if self._last is not None and self._last[0] == tau and self._last[1] == key:
            return self._last[2]
        return None


class Linearizer:
    """The linearization of f that the Jacobian shells use at a point PETSc asks about.

    Args:
        rhs: the right-hand side of this call.
        explicit: explicit RK adjoints take one cotangent per stage (the graph may be freed by it).
        graphs: kept stage graphs to use before building a new linearization (found and removed).
        stage_times: in an adjoint, the forward pass's stage times to linearise at (None: as asked).
        evaluated: ``evaluated(tau, key)`` gives f at a point PETSc just had evaluated, or None (a
            Newton iteration's difference JVPs start from it instead of evaluating it again).
    """

    def __init__(self, rhs: RHS, explicit: bool, graphs: Optional[GraphStore] = None,
                 stage_times: Optional[StageTimes] = None, evaluated=None):
        self.rhs = rhs
        self.evaluated = evaluated
        self.explicit = explicit
        self.graphs = graphs
        self.stage_times = stage_times
        self._last = None  # (tau, Vec key, linearization) of the latest point asked about

    def at(self, current: Optional[Linearization], tau: float, u) -> Linearization:
        """The linearization at ``(tau, u)`` (``u`` a Vec); ``current``: the one the shells hold."""
        key = vec_key(u)
        if self._last is not None and self._last[:2] == (tau, key):
            return self._last[2]  # implicit types ask twice per stage (J, then J_p) at an unchanged Vec
        view = vec_view(u)
        if self.rhs.matches(current, tau, view, key):
            return current
        lin = self.graphs.find(self.rhs, tau, view, key) if self.graphs is not None else None
        if lin is None:
            if self.stage_times is not None:
                tau_f = self.stage_times.forward_time(tau, key[0])
            else:
                tau_f = tau
            lin = self.rhs.linearize(tau_f, view, key, single_vjp=self.explicit)
            if self.evaluated is not None:
                lin.value = self.evaluated(tau, key)
        self._last = (tau, key, lin)
        return lin
