"""The user's right-hand side as PETSc sees it: flat PETSc-dtype state, PETSc time, counted evaluations.

:class:`RHS` wraps ``func(t, y)`` once per solve. It converts between the flat PETSc state and the
user's tensors (shape, dtype, device), maps PETSc's always-increasing time onto the user's time
axis (``t_user = direction * t_petsc``, so decreasing ``t`` integrates ``-f`` forward in PETSc time),
checks what ``func`` returns, and builds :class:`Linearization` objects for JVPs and VJPs.
"""

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .bridge import StateLayout, petsc_eps
from .errors import InputError

# Stage times whose tensors an RHS keeps for reuse (a solve's stages, and their adjoint's).
_TIME_CACHE = 4096


def stage_time_tolerance(tau: float) -> float:
    """How far apart two PETSc times near ``tau`` may lie and still denote the same stage time: a few
    hundred ulps of PETSc's real type (which holds the times), relative to ``max(1, |tau|)``."""
    return max(1e-13, 100 * petsc_eps()) * max(1.0, abs(tau))


def same_stage_time(a: float, b: float) -> bool:
    """Whether two PETSc times denote the same stage time (they differ by round-off only; see
    :func:`stage_time_tolerance`, computed inline: this runs for every stage)."""
    return abs(a - b) <= max(1e-13, 100 * petsc_eps()) * max(1.0, abs(b))


@dataclass
class EvaluationCounter:
    """Work done on the user's ``func``.

    Attributes:
        forward: evaluations of f without a graph (forward solves, initial-step selection).
        jvp: Jacobian-vector products (Newton-Krylov iterations of implicit methods).
        backward: evaluations of f with a graph, each followed by one or more VJPs (adjoint solves).
        vjp: vector-Jacobian products (one per ``backward`` for explicit methods, one per Krylov
            iteration of an implicit adjoint solve).
    """

    forward: int = 0
    jvp: int = 0
    backward: int = 0
    vjp: int = 0

    @property
    def nfe_forward(self) -> int:
        """NFE-F as the classic ODE-Net logs it: evaluations and JVPs in forward solves."""
        return self.forward + self.jvp


class RHS:
    """``f_petsc(tau, u) = direction * func(direction * tau, unflatten(u))`` with evaluation counters.

    Args:
        func: the user's ``func(t, y)``; ``t`` is a 0-dim tensor of the state's dtype and device,
            ``y`` a tensor (or tuple) shaped like ``y0``.
        layout: the state's layout.
        params: tensors that gradients are taken with respect to (``adjoint_params``).
        direction: +1.0 when the output times increase, -1.0 when they decrease.
        counter: where evaluations are counted (an :class:`EvaluationCounter`; a new one if None).
    """

    def __init__(self, func: Callable, layout: StateLayout, params: Sequence[torch.Tensor],
                 direction: float, counter: Optional[EvaluationCounter] = None,
                 jump_sides: Sequence[Tuple[float, float]] = ()):
        self.func = func
        self.layout = layout
        self.params = tuple(params)
        self.direction = direction
        self.counter = counter if counter is not None else EvaluationCounter()
        self.difference_jvp = False  # set per solve: Jacobian-vector products by differences
        self.jump_sides = tuple(jump_sides)
        self._times: Dict[float, torch.Tensor] = {}  # tau -> the 0-dim time func is given there
        self._checked = False  # func's output was checked once (its structure does not change)
        # a graph of a tensor state in increasing time starts at a leaf of the state's shape and ends at
        # func's own output: no reshape node on either side of func, which a VJP would pass through
        # (in decreasing time the graph keeps the signed flat output, which the value shares)
        self._shaped = not layout.is_tuple and direction > 0

    def user_time(self, tau: float) -> torch.Tensor:
        """The user's time of PETSc time ``tau`` (0-dim, the state's dtype and device).

        At a ``jump_t`` that bounds the solve (``jump_sides``: PETSc time, and the side to take) the
        time is moved one ulp to this solve's side of the jump, so that ``func`` evaluates the branch
        that holds inside it (as torchdiffeq's ``perturb`` does): a step ending at the jump sees ``f``
        before it, a step starting there ``f`` after it.
        """
        t = self._times.get(tau)
        if t is not None and t._version == 0 and not t.requires_grad:
            return t  # the adjoint asks at the forward's stage times: one tensor each (unless func changed it)
        # a fill, not torch.tensor: on a GPU that would copy the value from the host for every new stage time
        t = torch.full((), self.direction * tau, dtype=self.layout.dtype, device=self.layout.device)
        for jump, side in self.jump_sides:
            if same_stage_time(tau, jump):
                t = torch.nextafter(t, torch.tensor(side, dtype=t.dtype, device=t.device))
        if len(self._times) < _TIME_CACHE:
            self._times[tau] = t
        return t

    def to_user(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat PETSc-dtype tensor (host or the state's GPU) as a flat tensor of the user's dtype and device."""
        return flat.to(device=self.layout.device, dtype=self.layout.dtype)

    def call(self, tau: float, y_flat: torch.Tensor) -> torch.Tensor:
        """``direction * func(t, y)`` as a flat tensor of the user's dtype (graph kept if enabled)."""
        flat = self.layout.flatten(self._func(tau, self.layout.unflatten(y_flat)))
        return flat if self.direction > 0 else -flat

    def _func(self, tau: float, y):
        out = self.func(self.user_time(tau), y)
        if not self._checked:
            self._check_output(out)
            self._checked = True
        return out

    def graph_input(self, u: torch.Tensor) -> torch.Tensor:
        """The leaf a graph of f starts from, for ``u`` (flat, the user's dtype and device, its own
        copy): ``u`` shaped like the state for a tensor state in increasing time, else flat."""
        return (u.view(self.layout.shapes[0]) if self._shaped else u).detach().requires_grad_(True)

    def graph_output(self, tau: float, y: torch.Tensor) -> torch.Tensor:
        """f at the leaf ``y`` of :meth:`graph_input`, with its graph (under grad mode): ``func``'s
        own output for a tensor state in increasing time, ``call``'s flat, signed one otherwise."""
        return self._func(tau, y) if self._shaped else self.call(tau, y)

    @staticmethod
    def from_graph(tensor: torch.Tensor) -> torch.Tensor:
        """An output-shaped tensor of a graph (f's value, a JVP) as PETSc's flat ``f`` (user dtype)."""
        return tensor.reshape(-1)

    def cotangent_in_graph(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A flat cotangent of PETSc's ``f`` (the user's dtype) as the cotangent of the graph's output
        ``out`` (:meth:`graph_output`), shaped like it."""
        return x.view(out.shape) if self._shaped else x

    def evaluate(self, tau: float, u: torch.Tensor) -> torch.Tensor:
        """Forward evaluation without a graph at a flat PETSc-dtype state ``u``.

        Returns a flat tensor of the user's dtype and device: the caller casts it once, on its way
        into a PETSc Vec (:func:`pnode._impl.bridge.tensor_into_vec`).
        """
        self.counter.forward += 1
        if torch.is_grad_enabled():  # a solve's callbacks run without grad mode already
            with torch.no_grad():
                return self.call(tau, self.to_user(u))
        return self.call(tau, self.to_user(u))

    def linearize(self, tau: float, u: torch.Tensor, key: Optional[Tuple[int, int]] = None,
                  single_vjp: bool = False) -> "Linearization":
        """The linearization at ``(tau, u)``; ``u`` is a PETSc-dtype view, copied into the user's dtype.

        ``key``: the :func:`pnode._impl.bridge.vec_key` of the Vec that ``u`` views, if any.
        ``single_vjp``: the caller expects one cotangent only (explicit RK adjoints), so the graph
        may be freed during that VJP (see :class:`Linearization`).
        """
        user = u.to(device=self.layout.device, dtype=self.layout.dtype, copy=True)
        return Linearization(self, tau, user, key, single_vjp)

    def evaluate_linearized(self, tau: float, u: torch.Tensor, key: Optional[Tuple[int, int]] = None,
                            forward: bool = False, measure: bool = True) -> Tuple[torch.Tensor, "Linearization"]:
        """Evaluate ``f(tau, u)`` with its graph kept, for VJPs at this point later.

        Returns the value (flat, the user's dtype and device) and the :class:`Linearization` that
        holds the graph. The stage evaluations then serve the adjoint's Jacobian products instead
        of being evaluated again (kept graphs, or a step re-taken just before its adjoint);
        ``forward``: count it as a forward evaluation; ``measure``: sum the bytes the graph holds
        into its ``graph_bytes`` (a saved-tensors hook per saved tensor, which costs on small states).
        """
        lin = self.linearize(tau, u, key, single_vjp=True)
        lin._build_graph(measure=measure, forward=forward)
        return lin.value, lin

    def matches(self, lin: Optional["Linearization"], tau: float, u: torch.Tensor,
                key: Optional[Tuple[int, int]] = None) -> bool:
        """Whether ``lin`` linearises ``f`` at ``(tau, u)`` (``u``: flat PETSc-dtype view).

        The time may differ by round-off: PETSc's RK adjoint recomputes a stage time as
        ``t_end - (1 - c_i) h`` where the forward step used ``t + c_i h``. The state matches when
        it is the same unchanged Vec (``key``), or else when it equals ``lin``'s bit for bit in the
        user's dtype, which is all that ``func`` sees.
        """
        if lin is None or not same_stage_time(lin.tau, tau):
            return False
        if key is not None and key == lin.key:
            return True
        if lin.spent:  # serving another point would rebuild its graph: no cheaper than a new one
            return False
        return torch.equal(lin.u, self.to_user(u))

    def _check_output(self, out) -> None:
        layout = self.layout
        parts = out if isinstance(out, (tuple, list)) else (out,)
        if isinstance(out, (tuple, list)) != layout.is_tuple or len(parts) != len(layout.shapes):
            raise InputError(
                f"func returned {_describe(out)} for a state of {_describe_layout(layout)}; "
                "func(t, y) must return dy/dt with the same structure as y0")
        for part, shape in zip(parts, layout.shapes):
            if not isinstance(part, torch.Tensor) or part.shape != shape:
                got = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
                raise InputError(f"func returned shape {got} for a state of shape {tuple(shape)}; "
                                 "func(t, y) must return dy/dt shaped like y")
            if part.dtype != layout.dtype:
                raise InputError(f"func returned dtype {part.dtype} for a state of dtype {layout.dtype}; "
                                 "make func return the dtype of y0 (e.g. cast its parameters with .to(y0.dtype))")


class Linearization:
    """``f`` linearised at one point ``(tau, u)``: Jacobian-vector and vector-Jacobian products.

    The forward graph is built on first use, so the state VJP (for ``J^T``) and the parameter VJP
    (for ``J_p^T``, or an explicit RK adjoint's own sum) of one vector cost one backward pass, and the
    repeated ``J^T x`` of an implicit adjoint solve reuse one forward evaluation. With
    ``single_vjp`` (explicit methods: one cotangent per stage) the graph is freed by that backward
    pass, which is ~20 % faster than retaining it; a second cotangent would rebuild it.
    """

    def __init__(self, rhs: RHS, tau: float, u: torch.Tensor, key: Optional[Tuple[int, int]] = None,
                 single_vjp: bool = False):
        self.rhs = rhs
        self.tau = tau
        self.u = u
        self.key = key
        self.single_vjp = single_vjp
        self._graph: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.value: Optional[torch.Tensor] = None  # f at this point, once the graph is built (detached)
        self.graph_bytes = 0  # bytes the graph holds: saved tensors, input and output
        self._cached_key: Optional[Tuple[int, int]] = None
        self._cached_vjp: Optional[Tuple[torch.Tensor, Tuple[Optional[torch.Tensor], ...]]] = None
        self._transposed_graph: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (w, J^T w) for JVPs

    def _build_graph(self, measure: bool = False, forward: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Evaluate f with its graph (once); ``measure``: sum the bytes it holds into ``graph_bytes``;
        ``forward``: a forward pass's evaluation (counted as NFE-F, not NFE-B)."""
        if self._graph is None:
            if forward:
                self.rhs.counter.forward += 1
            else:
                self.rhs.counter.backward += 1
            y = self.rhs.graph_input(self.u)
            if measure:
                saved: Dict[int, int] = {}  # storage address -> bytes of each tensor the graph saves
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_noting_pack(saved), _same):
                    out = self.rhs.graph_output(self.tau, y)
                for tensor in (y, out):
                    _note_storage(saved, tensor)
                self.graph_bytes = sum(saved.values())
            else:
                with torch.enable_grad():
                    out = self.rhs.graph_output(self.tau, y)
            self._graph = (y, out)
            self.value = self.rhs.from_graph(out.detach())
        return self._graph

    def vjp(self, x: torch.Tensor, key: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[Optional[torch.Tensor], ...]]:
        """``(x^T df/du, x^T df/dp)`` for a flat cotangent ``x`` (PETSc dtype, the vectors' device).

        ``key``: the :func:`pnode._impl.bridge.vec_key` of the Vec that ``x`` views; PETSc asks for the
        state and the parameter part with the same unchanged Vec, and the second ask is served
        from the first's result.

        Returns the state part as a flat tensor of the user's dtype and device, and one gradient
        (or ``None``) per parameter.
        """
        if key == self._cached_key:
            return self._cached_vjp
        y, out = self._build_graph()
        self.rhs.counter.vjp += 1
        inputs = (y,) + self.rhs.params
        if out.requires_grad:
            cotangent = self.rhs.cotangent_in_graph(self.rhs.to_user(x), out)
            grads = vector_jacobian(out, inputs, cotangent, retain_graph=not self.single_vjp)
        else:  # f depends on neither the state nor a parameter (f(t) only): every product is zero
            grads = (None,) * len(inputs)
        if self.single_vjp:
            self._graph = None
        state_grad = grads[0].reshape(-1) if grads[0] is not None else torch.zeros_like(self.u)
        self._cached_key = key
        self._cached_vjp = (state_grad, tuple(grads[1:]))
        return self._cached_vjp

    @property
    def spent(self) -> bool:
        """Whether its one VJP (``single_vjp``) was taken, freeing the graph."""
        return self.single_vjp and self._graph is None and self._cached_key is not None

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """``df/du v`` for a flat tangent ``v`` (PETSc dtype, the vectors' device); flat, user dtype and device.

        Exact, by reverse mode twice: ``J v = d/dw (J^T w)^T v``. The graph of ``J^T w`` (``w`` a
        free cotangent) is built once per linearization; each product is then one backward pass
        through it, about the cost of one evaluation of f (forward-mode AD, ``torch.func.jvp``, costs
        some twenty on the torch pnode runs on; it remains the fallback for an f without a double
        backward). With ``rhs.difference_jvp``: a one-sided difference ``(f(u + h v) - f(u)) / h``
        (one evaluation; :meth:`_difference_jvp`).
        """
        tangent = self.rhs.to_user(v)
        self.rhs.counter.jvp += 1
        if self.rhs.difference_jvp:
            return self._difference_jvp(tangent)
        try:
            transposed = self._transposed()
            if transposed is None:  # f does not depend on the state
                return torch.zeros_like(tangent)
            w, jt_w = transposed
            (jv,) = torch.autograd.grad(jt_w, w, grad_outputs=tangent.view(jt_w.shape), retain_graph=True)
            return self.rhs.from_graph(jv)
        except RuntimeError:  # an operation without a double backward
            with warnings.catch_warnings():
                # torch.func.jvp trips torch.jit's deprecation warning internally on some versions
                warnings.simplefilter("ignore", FutureWarning)
                _, out = torch.func.jvp(lambda y: self.rhs.call(self.tau, y), (self.u,), (tangent,))
            return out

    def _transposed(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(w, J^T w)`` with the graph of ``J^T w`` kept (built on first use), or None when f does not
        depend on the state."""
        if self._transposed_graph is None:
            y, out = self._build_graph()
            if not out.requires_grad:
                return None
            with torch.enable_grad():
                w = torch.zeros_like(out, requires_grad=True)
                (jt_w,) = torch.autograd.grad(out, y, grad_outputs=w, create_graph=True, retain_graph=True,
                                              allow_unused=True)
            if jt_w is None or not jt_w.requires_grad:
                return None
            self._transposed_graph = (w, jt_w)
        return self._transposed_graph

    def _difference_jvp(self, tangent: torch.Tensor) -> torch.Tensor:
        """``(f(u + h v) - f(u)) / h`` with ``h = sqrt(eps) max(|u|, sqrt(n)) / |v|`` (2-norms, eps of
        the coarser of the state's dtype and PETSc's): the perturbation is ``sqrt(eps)`` of the state,
        which balances truncation and round-off (each about ``sqrt(eps)`` relative). ``f(u)`` is
        the evaluation PETSc just asked for at this point when there was one."""
        norm_v = float(tangent.norm())
        if norm_v == 0.0:
            return torch.zeros_like(tangent)
        eps = max(float(torch.finfo(self.u.dtype).eps), petsc_eps())
        h = eps ** 0.5 * max(float(self.u.norm()), self.u.numel() ** 0.5) / norm_v
        with torch.no_grad():
            if self.value is None:
                self.value = self.rhs.call(self.tau, self.u)
            return (self.rhs.call(self.tau, self.u + h * tangent) - self.value) / h


def vector_jacobian(output: torch.Tensor, inputs: Tuple[torch.Tensor, ...], cotangent: torch.Tensor,
                    retain_graph: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """``cotangent^T d output / d inputs`` (None for an input ``output`` does not depend on).

    ``torch.autograd.grad`` validates and normalises its arguments in Python first, which costs
    about as much as the backward pass through a small network; a stage's VJP has one output and a
    cotangent already of its shape and dtype, so autograd's engine is called directly, as
    ``torch.autograd.grad`` itself does in the end (checked once per process, with
    ``torch.autograd.grad`` where the engine's entry point differs).
    """
    if _ENGINE_VJP[0] is None:
        _ENGINE_VJP[0] = _engine_vjp_works()
    if _ENGINE_VJP[0]:
        return _run_backward((output,), (cotangent,), retain_graph, False, inputs, True, False)
    return torch.autograd.grad(output, inputs, grad_outputs=cotangent, retain_graph=retain_graph, allow_unused=True)


def _run_backward(*args):
    return torch.autograd.Variable._execution_engine.run_backward(*args)


_ENGINE_VJP: List[Optional[bool]] = [None]


def _engine_vjp_works() -> bool:
    """Whether autograd's engine takes the arguments ``torch.autograd.grad`` gives it on this torch."""
    try:
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        with torch.enable_grad():
            out = x * x
        (grad,) = _run_backward((out,), (torch.ones(2),), False, False, (x,), True, False)
        return bool(torch.equal(grad, torch.tensor([2.0, 4.0])))
    except (AttributeError, TypeError, RuntimeError):
        return False


def _note_storage(saved: Dict[int, int], tensor: torch.Tensor) -> None:
    """Note the bytes of ``tensor``'s storage in ``saved`` (by address: a view and its base count once)."""
    storage = tensor.untyped_storage()
    saved[storage.data_ptr()] = storage.nbytes()


def _noting_pack(saved: Dict[int, int]):
    """A saved-tensors pack hook that notes the bytes of each saved tensor's storage (a view and its
    base count once) and saves the tensor's data.

    It saves ``tensor.detach()`` (same storage and version counter), never the tensor itself:
    for a node's own output that would be a cycle node -> saved tensor -> its ``grad_fn`` (the
    node) that Python's garbage collector cannot see, and a graph dropped without a backward pass
    would never be freed. For the same reason the hook keeps sizes only, no tensors (torch keeps
    the hook with every tensor it saved).
    """
    def pack(tensor: torch.Tensor) -> torch.Tensor:
        _note_storage(saved, tensor)
        return tensor.detach()
    return pack


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} items"
    return f"an object of type {type(out).__name__}"


def _describe_layout(layout: StateLayout) -> str:
    if layout.is_tuple:
        return f"a tuple of {len(layout.shapes)} tensors"
    return f"shape {tuple(layout.shapes[0])}"
