"""Input checking at the door: turn the torchdiffeq-style call into one canonical :class:`Problem`.

Everything that can be wrong with the arguments is detected here, before any PETSc object is
touched, and reported with what was received and what to do instead.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .._compat import PETSc
from ..distributed import resolve_comm
from .block_jacobian import CHOICES as JACOBIAN_CHOICES
from .block_jacobian import default_jacobian
from .bridge import StateLayout, layout_of, petsc_dtype, petsc_eps
from .budget import MemoryBudget, parse_bytes
from .callbacks import StepCallbacks, find_step_callbacks
from .config import LOW_RESOLUTION, SolverConfig
from .errors import InputError
from .event_search import EventWatch
from .imex import is_split
from .methods import resolve_method
from .options import get_global_option, option_value
from .rhs import RHS, EvaluationCounter
from .solver import Span
from .stats import SolveStats
from .strategies import BinomialCheckpoints, KeptGraphs, StoredStates, Strategy
from .timeplan import TimePlan, time_plan

# torchdiffeq options that map onto PETSc's adaptive controller.
_ADAPT_OPTION_MAP = {"safety": "ts_adapt_safety"}
# torchdiffeq options pnode cannot honour, with what to do instead.
_UNSUPPORTED_OPTIONS = {
    "perturb": "PETSc steps cannot be perturbed; pass the discontinuities as options={'jump_t': times}, "
               "where pnode splits the integration and evaluates f again",
    "norm": "PETSc's controller uses a weighted RMS norm; choose another with "
            "options={'ts_adapt_wnormtype': 'infinity'}",
    "dtype": "PETSc integrates in its scalar type (float64); the state keeps its own dtype",
}


@dataclass
class Problem:
    """A canonical ODE problem.

    Attributes:
        func: the user's ``func(t, y)``.
        layout: how the state packs into a flat vector.
        y0_flat: the initial state, flat, user dtype and device (keeps its autograd history).
        t: the user's output times (1-D, float, possibly requiring grad).
        taus: the output times in PETSc time, strictly increasing, float64 ``(n_times,)``.
        direction: +1.0 for increasing ``t``, -1.0 for decreasing.
        config: the solver configuration (part of the solver cache key).
        comm: the PETSc communicator.
        params: tensors gradients are taken with respect to.
        counter: where evaluations are counted.
        checkpoints: pnode's checkpoint budget K (at most K trajectory states held at once, see
            :mod:`pnode._impl.checkpoint`), or ``None``: PETSc's trajectory stores every step.
        strategy: the adjoint strategy (:mod:`pnode._impl.strategies`, :mod:`pnode._impl.budget`).
        stats: what the solves of this call ran and held (shared with an ``ODEBlock``).
        plan: prescribed step times and jumps (``step_t``, ``jump_t``, ``grid_constructor``), or
            None (see :mod:`pnode._impl.timeplan`).
        callbacks: the torchdiffeq step callbacks ``func`` defines, or None (see :mod:`pnode._impl.callbacks`).
        event: the solve ends at an event (its ``taus`` are ``[tau0, event.tau_max]``), or None.
        first_step: the first step's size when the solve goes on from an earlier one (a jump), or None.
        tolerances: per-entry ``(rtol, atol)`` (flat, PETSc dtype, CPU) when they were given as
            tensors, or None (``config.rtol``/``config.atol`` apply).
        jump_sides: ``jump_t`` times that bound this solve (PETSc time) with the side of the jump
            its evaluations there take (see :meth:`pnode._impl.rhs.RHS.user_time`).
    """

    func: Callable
    layout: StateLayout
    y0_flat: torch.Tensor
    t: torch.Tensor
    taus: np.ndarray
    direction: float
    config: SolverConfig
    comm: object
    params: Tuple[torch.Tensor, ...]
    counter: EvaluationCounter
    strategy: Optional[Strategy] = None
    stats: Optional[SolveStats] = None
    plan: Optional[TimePlan] = None
    callbacks: Optional[StepCallbacks] = None
    event: Optional[EventWatch] = None
    first_step: Optional[float] = None
    tolerances: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    jump_sides: Tuple[Tuple[float, float], ...] = ()

    def rhs(self, params) -> RHS:
        """The right-hand side of one solve of this problem, differentiating ``params``."""
        return RHS(self.func, self.layout, params, self.direction, self.counter, self.jump_sides)

    @property
    def span(self) -> Span:
        """What one forward solve of this problem covers (:class:`pnode._impl.solver.Span`)."""
        return Span(self.taus, self.first_step, self.tolerances, self.event)


def check_inputs(func, y0, t, rtol, atol, method, options, comm, params=(), prefix=None,
                 stats: Optional[SolveStats] = None, default_adjoint: str = "states") -> Problem:
    """Validate and canonicalise the arguments of ``odeint``/``odeint_adjoint``.

    ``default_adjoint``: the adjoint strategy when ``options`` chooses none (``'states'`` for
    ``odeint_adjoint``, ``'graphs'`` for ``odeint``, whose memory profile is backprop's).

    Raises:
        InputError: with a message naming the argument, what was received and how to fix it.
    """
    if not callable(func):
        raise InputError(f"func must be callable as func(t, y), got {type(func).__name__}")
    layout = _check_y0(y0)
    y0_flat = layout.flatten(y0)
    t = _check_t(t, layout)
    taus_user = t.detach().to("cpu", torch.float64).numpy()
    direction = 1.0 if len(taus_user) < 2 or taus_user[1] > taus_user[0] else -1.0
    taus = np.ascontiguousarray(direction * taus_user)
    rtol, atol, tolerances = _tolerances(rtol, atol, layout)
    if not isinstance(options, (dict, type(None))):
        raise InputError(f"options must be a dict, got {type(options).__name__}")
    opts = dict(options or {})  # the caller's dict is left alone; keys are consumed from this copy
    prefix = "" if not prefix else prefix if prefix.endswith("_") else prefix + "_"
    strategy = adjoint_strategy(opts, prefix, default_adjoint)
    prescribed = [opts.pop(key, None) for key in ("jump_t", "step_t", "grid_constructor")]
    resolution = max(float(torch.finfo(layout.dtype).eps), petsc_eps())
    config = _make_config(resolve_method(method), rtol, atol, opts, prefix, resolution, tolerances is not None,
                          layout=layout, split=is_split(func))
    plan = time_plan(*prescribed, func, y0, t, config.adaptive, config.step_size is not None, config.method.name)
    callbacks = find_step_callbacks(func, layout, direction, t.dtype, config.adaptive, config.method.name)
    stats = stats if stats is not None else SolveStats()
    return Problem(func, layout, y0_flat, t, taus, direction, config, resolve_comm(comm), tuple(params),
                   stats.counter, strategy, stats, plan, callbacks, tolerances=tolerances)


def _tolerances(rtol, atol, layout: StateLayout):
    """``(rtol, atol, per_entry)``: numbers, and for tolerances given per entry of the state (tensors
    broadcastable to it, or for a tuple state a tuple of numbers or such tensors) the flat PETSc-dtype
    ``(rtol, atol)`` vectors PETSc's controller takes (None when both are numbers)."""
    values = [_tolerance(name, value, layout) for name, value in (("rtol", rtol), ("atol", atol))]
    if all(isinstance(v, float) for v in values):
        if not (values[0] >= 0 and values[1] > 0):
            raise InputError(f"rtol must be >= 0 and atol > 0 (finite numbers), got rtol={rtol!r}, atol={atol!r}")
        return values[0], values[1], None
    flat = [torch.full((layout.numel,), v, dtype=petsc_dtype()) if isinstance(v, float) else v for v in values]
    if not bool((flat[1] + flat[0] > 0).all()):
        raise InputError("rtol + atol must be positive for every entry of the state: no entry can be held to a "
                         "zero error")
    return float(flat[0].max()), float(flat[1].max()), (flat[0], flat[1])


def _tolerance(name: str, value, layout: StateLayout):
    """A number (a float), or a flat per-entry tensor (PETSc dtype, CPU) for a tensor or tuple tolerance."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return _tolerance(name, float(value.detach()), layout)
    parts = value if isinstance(value, (tuple, list)) else (value,)
    if isinstance(value, (tuple, list)) != layout.is_tuple or len(parts) != len(layout.shapes):
        expected = (f"a tuple of {len(layout.shapes)} (one per tensor of the state)" if layout.is_tuple else
                    "a tensor broadcastable to the state's shape")
        raise InputError(f"{name} must be a number, a 0-dim tensor or {expected}; got {_describe_tolerance(value)}")
    flat = []
    for i, (part, shape) in enumerate(zip(parts, layout.shapes)):
        where = f"{name}[{i}]" if layout.is_tuple else name
        tensor = torch.as_tensor(part.detach() if isinstance(part, torch.Tensor) else part, dtype=torch.float64)
        try:
            tensor = tensor.to("cpu").expand(shape)
        except RuntimeError:
            raise InputError(f"{where} has shape {tuple(tensor.shape)}, which does not broadcast to the state's "
                             f"shape {tuple(shape)}; give one tolerance per entry, or a number") from None
        if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
            raise InputError(f"{where} must hold finite values >= 0")
        flat.append(tensor.reshape(-1))
    return torch.cat(flat).to(petsc_dtype())


def _describe_tolerance(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:80]


def adjoint_strategy(opts: Dict[str, object], prefix: str, default: str = "states"):
    """The adjoint strategy of ``opts`` (consumes ``adjoint``, ``checkpoints``, ``checkpoint_graphs``,
    ``memory_budget``; each also ``-[<prefix>]pnode_<key>`` on the command line, which wins);
    ``default`` ('states' or 'graphs') when they choose none."""
    checkpoints = _checkpoints(opts.pop("checkpoints", None), prefix)
    graphs = _checkpoint_graphs(opts.pop("checkpoint_graphs", True), prefix)
    budget, budget_source = _pnode_option("memory_budget", opts.pop("memory_budget", None), prefix)
    kind, source = _pnode_option("adjoint", opts.pop("adjoint", None), prefix)
    kinds = {"graphs": KeptGraphs, "states": StoredStates, None: None}
    if kind not in kinds:
        raise InputError(f"{source} must be 'graphs' (keep every stage graph: backprop's speed and memory) or "
                         f"'states' (store states, re-evaluate f in the backward pass), got {kind!r}")
    chosen = [name for name, value in (("adjoint", kind), ("checkpoints", checkpoints),
                                       ("memory_budget", budget)) if value is not None]
    if len(chosen) > 1:
        raise InputError(f"options {chosen} each choose how the adjoint holds its data; give one of them "
                         "(memory_budget picks graphs, states or checkpoints by itself)")
    if budget is not None:
        return MemoryBudget(parse_bytes(budget, budget_source), graphs)
    if checkpoints is not None:
        return BinomialCheckpoints(checkpoints, graphs)
    return (kinds[kind] or kinds[default])()


def _pnode_option(key: str, value, prefix: str) -> Tuple[object, str]:
    """``-<prefix>pnode_<key>``, else ``-pnode_<key>``, else ``options[key]`` (``value``).

    The command line wins over ``options`` as for every PETSc option. Returns the value (the
    option's text when it came from the command line) and where it came from, for error messages.
    """
    for name in dict.fromkeys((f"{prefix}pnode_{key}", f"pnode_{key}")):
        text = get_global_option(name)
        if text is not None:
            return text, f"-{name}"
    return value, f"options[{key!r}]"


def _checkpoint_graphs(value, prefix: str) -> Optional[int]:
    """``-<prefix>pnode_checkpoint_graphs``, else ``-pnode_checkpoint_graphs``, else ``value``.

    ``True``/'true'/'yes'/'all': keep every stage graph (``None``); ``False``/'false'/'no'/'none':
    none (0); an integer ``n >= 0`` (or its text): the last ``n``.
    """
    value, source = _pnode_option("checkpoint_graphs", value, prefix)
    if isinstance(value, bool):
        return None if value else 0
    words = {"true": None, "yes": None, "all": None, "false": 0, "no": 0, "none": 0}
    if isinstance(value, str):
        text = value.strip().lower()
        if text in words:
            return words[text]
        value = int(text) if text.isdigit() else value
    if isinstance(value, int) and value >= 0:
        return value
    raise InputError(f"{source} must be true (keep every stage graph), false (none) or a number of "
                     f"stage graphs n >= 0 (the last n stages'), got {value!r}")


def _checkpoints(value, prefix: str) -> Optional[int]:
    """The checkpoint budget: ``-<prefix>pnode_checkpoints``, else ``-pnode_checkpoints``, else ``value``.

    The command line wins over ``options`` as for every PETSc option; 0 on the command line turns
    pnode's checkpointing off (store every step).
    """
    value, source = _pnode_option("checkpoints", value, prefix)
    if value is None:
        return None
    try:
        count = int(value)
        if count != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"{source} must be a whole number of checkpoints, got {value!r}") from None
    if count < 0:
        raise InputError(f"{source} must be >= 1 (states held at once), or 0 to store every step; got {count}")
    return count or None


def _check_y0(y0) -> StateLayout:
    parts = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
    if len(parts) == 0:
        raise InputError("y0 is an empty tuple; pass a tensor or a non-empty tuple of tensors")
    for i, part in enumerate(parts):
        where = f"y0[{i}]" if isinstance(y0, (tuple, list)) else "y0"
        if not isinstance(part, torch.Tensor):
            raise InputError(f"{where} must be a torch.Tensor, got {type(part).__name__}")
        if not part.is_floating_point():
            raise InputError(f"{where} has dtype {part.dtype}; the state must be floating point "
                             "(use y0.double() or y0.float())")
        if part.dtype != parts[0].dtype or part.device != parts[0].device:
            raise InputError(f"{where} has dtype {part.dtype} on {part.device} but y0[0] has "
                             f"{parts[0].dtype} on {parts[0].device}; all tensors of a tuple state "
                             "must share dtype and device")
        if not bool(torch.isfinite(part.detach()).all()):
            raise InputError(f"{where} contains NaN or inf; the initial state must be finite")
    return layout_of(y0)


def _check_t(t, layout: StateLayout) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=layout.dtype)
        except (TypeError, ValueError) as exc:
            raise InputError(f"t must be a 1-D tensor of output times, got {type(t).__name__}") from exc
    if t.dim() != 1 or t.numel() == 0:
        raise InputError(f"t must be a 1-D tensor with at least one time, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(layout.dtype)
    values = t.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise InputError("t contains NaN or inf; output times must be finite")
    if values.numel() > 1:
        steps = values[1:] - values[:-1]
        if not (bool((steps > 0).all()) or bool((steps < 0).all())):
            bad = int(torch.nonzero((steps * torch.sign(steps[0])) <= 0)[0])
            raise InputError(f"t must be strictly increasing or strictly decreasing; t[{bad}]={values[bad]:.6g} "
                             f"and t[{bad + 1}]={values[bad + 1]:.6g} break the order")
    return t


def _make_config(method, rtol, atol, opts: Dict[str, object], prefix: str, resolution: float,
                 vector_tolerances: bool = False, layout: Optional[StateLayout] = None,
                 split: bool = False) -> SolverConfig:
    """The solver configuration; consumes the keys of ``opts`` (a copy) and takes a normalised prefix
    (``layout``: the state's, for the default of ``jacobian``; ``split``: func is a pnode.IMEX)."""
    step_size = _positive(opts.pop("step_size", None), "step_size")
    first_step = _positive(opts.pop("first_step", None), "first_step")
    min_step = _positive(opts.pop("min_step", None), "min_step", allow_zero=True)
    max_step = _positive(opts.pop("max_step", None), "max_step", allow_inf=True)
    max_num_steps = opts.pop("max_num_steps", None)
    if max_num_steps is not None and (not isinstance(max_num_steps, int) or max_num_steps < 1):
        raise InputError(f"options['max_num_steps'] must be a positive int, got {max_num_steps!r}")
    implicit_solve, source = _pnode_option("implicit_solve", opts.pop("implicit_solve", "newton"), prefix)
    if implicit_solve not in ("newton", "linear"):
        raise InputError(f"{source} must be 'newton' (solve each implicit stage to the Newton tolerance) or "
                         f"'linear' (one Newton step: a linearly implicit method), got {implicit_solve!r}")
    default_jvp = "difference" if implicit_solve == "newton" and resolution > LOW_RESOLUTION else "autodiff"
    jvp, source = _pnode_option("jvp", opts.pop("jvp", default_jvp), prefix)
    if jvp not in ("autodiff", "difference"):
        raise InputError(f"{source} must be 'autodiff' (exact Jacobian-vector products) or 'difference' "
                         f"(one evaluation of f each), got {jvp!r}")
    jacobian = _jacobian_choice(opts.pop("jacobian", None), prefix, layout, method.implicit)
    petsc: Dict[str, object] = {}
    if "theta" in opts:
        petsc["ts_theta_theta"] = opts.pop("theta")
    for key in ("ifactor", "dfactor"):
        if key in opts:
            low, high = 1.0 / float(opts.pop("dfactor", 5.0)), float(opts.pop("ifactor", 10.0))
            petsc["ts_adapt_clip"] = f"{low},{high}"
    for key, name in _ADAPT_OPTION_MAP.items():
        if key in opts:
            petsc[name] = opts.pop(key)
    interp = opts.pop("interp", "linear")
    if interp not in ("linear", "cubic"):  # torchdiffeq's fixed-grid output interpolation; pnode lands on outputs
        raise InputError(f"options['interp'] must be 'linear' or 'cubic' (torchdiffeq's choices; pnode ends a step "
                         f"on every output time, so it interpolates nothing and either has no effect), got {interp!r}")
    for key in list(opts):
        if key in _UNSUPPORTED_OPTIONS:
            raise InputError(f"options[{key!r}] is a torchdiffeq option pnode cannot honour: "
                             f"{_UNSUPPORTED_OPTIONS[key]}")
        petsc[key.lstrip("-")] = opts.pop(key)
    _warn_below_resolution(petsc)
    return SolverConfig(method=method, rtol=rtol, atol=atol, step_size=step_size, first_step=first_step,
                        min_step=min_step, max_step=max_step,
                        max_num_steps=max_num_steps if max_num_steps is not None else 2**31 - 1,
                        petsc_options=tuple(sorted((k, option_value(v)) for k, v in petsc.items())),
                        prefix=prefix, resolution=resolution, implicit_solve=implicit_solve,
                        jvp=jvp, vector_tolerances=vector_tolerances,
                        jacobian=jacobian, split=split)

def _jacobian_choice(value, prefix: str, layout: Optional[StateLayout], implicit: bool) -> str:
    """``options['jacobian']`` (or ``-[<prefix>]pnode_jacobian``): ``'blocks'``, ``'matrix_free'``, or by
    default :func:`pnode._impl.block_jacobian.default_jacobian` of the state's layout."""
    value, source = _pnode_option("jacobian", value, prefix)
    if value is None:
        return default_jacobian(layout, implicit) if layout is not None else "matrix_free"
    if value not in JACOBIAN_CHOICES:
        raise InputError(f"{source} must be 'blocks' (precondition Newton-Krylov with the dense per-sample Jacobian "
                         f"blocks, one batched LU) or 'matrix_free' (Jacobian-vector products only), got {value!r}")
    return value


def _warn_below_resolution(petsc: Dict[str, object]) -> None:
    """Warn about Newton/Krylov relative tolerances finer than PETSc's real type can resolve.

    In a single-precision PETSc a ``ksp_rtol`` of 1e-8 cannot be reached: every linear solve then
    runs to ``ksp_max_it`` (many JVPs per step) instead of stopping at float32 round-off.
    """
    floor = 4 * petsc_eps()
    for key, value in petsc.items():
        if key.endswith(("ksp_rtol", "snes_rtol")):
            try:
                tol = float(value)
            except (TypeError, ValueError):
                continue  # PETSc reports a malformed value itself
            if 0 < tol < floor:
                warnings.warn(f"options[{key!r}] = {value!r} is below what this PETSc's "
                              f"{np.dtype(PETSc.RealType).name} can resolve ({floor:.1e}): the solves would "
                              f"stop at their iteration limits, not at the tolerance; use {floor:.1e} or more",
                              stacklevel=4)


def _positive(value, name, allow_zero=False, allow_inf=False):
    """``value`` as a float checked to be > 0 (>= 0 with ``allow_zero``); None for no value.

    With ``allow_inf``, ``inf`` means no bound (torchdiffeq's default ``max_step``) and gives None.
    """
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"options[{name!r}] must be a number, got {value!r}") from None
    if allow_inf and value == math.inf:
        return None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InputError(f"options[{name!r}] must be {'> 0 (inf: no limit)' if allow_inf else 'finite and ' + bound}, "
                         f"got {value!r}")
    return value


def check_adjoint_keywords(method, adjoint_method, adjoint_rtol, adjoint_atol, adjoint_options) -> None:
    """Refuse an ``adjoint_method`` other than ``method``; warn that adjoint tolerances are ignored."""
    if adjoint_method is not None and adjoint_method != method:
        raise InputError(f"adjoint_method={adjoint_method!r} differs from method={method!r}: pnode's "
                         "discrete adjoint retraces the forward steps and cannot change method; "
                         "leave adjoint_method=None")
    ignored = [name for name, value in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol),
                                        ("adjoint_options", adjoint_options)) if value]
    if ignored:
        warnings.warn(f"{', '.join(ignored)} ignored: the discrete adjoint retraces the forward steps and "
                      "has no tolerances of its own; tune implicit adjoint solves with PETSc options "
                      "(e.g. options={'ksp_rtol': 1e-12})", stacklevel=3)


def resolve_params(func, adjoint_params) -> Tuple[torch.Tensor, ...]:
    """The tensors to differentiate: ``adjoint_params`` or, for an nn.Module, its parameters.

    Tensors that do not require grad are dropped (as torchdiffeq does). A plain function that
    closes over tensors requiring grad, with no ``adjoint_params``, triggers a warning, because
    those tensors would silently get no gradient.
    """
    if adjoint_params is None:
        if isinstance(func, nn.Module):
            candidates = tuple(func.parameters())
        else:
            candidates = ()
            _warn_on_hidden_params(func)
    else:
        candidates = tuple(adjoint_params)
        for p in candidates:
            if not isinstance(p, torch.Tensor):
                raise InputError(f"adjoint_params must hold tensors, got {type(p).__name__}")
    return tuple(p for p in candidates if p.requires_grad)


def _warn_on_hidden_params(func) -> None:
    hidden = [tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__ for p in _closed_over(func)]
    if hidden:
        warnings.warn(f"func closes over tensors/modules that require grad ({hidden}) but adjoint_params "
                      "was not given, so they get no gradient; pass them: "
                      "odeint_adjoint(func, y0, t, adjoint_params=(...))", stacklevel=4)


def reachable_params(func) -> Tuple[torch.Tensor, ...]:
    """The tensors requiring grad that backpropagating through ``func`` would reach, as far as they
    can be seen without running it: an ``nn.Module``'s parameters, those of the module a bound method
    belongs to, and the tensors and modules a function closes over (nested functions included).

    This is what :func:`pnode.odeint` differentiates, as backpropagation through torchdiffeq's
    ``odeint`` would; a tensor reached only through a global variable is not seen.
    """
    found: Dict[int, torch.Tensor] = {}
    for item in _closed_over(func, include_module=True):
        tensors = item.parameters() if isinstance(item, nn.Module) else (item,)
        for tensor in tensors:
            if tensor.requires_grad:
                found.setdefault(id(tensor), tensor)
    return tuple(found.values())


def _closed_over(func, include_module: bool = False, depth: int = 3) -> list:
    """Modules and tensors requiring grad that ``func`` holds: itself (a module), the module of a bound
    method, its closure cells and those of the functions they hold, ``depth`` levels deep."""
    if isinstance(func, nn.Module):
        return [func] if include_module else []
    owner = getattr(func, "__self__", None)
    if isinstance(owner, nn.Module):
        return [owner]
    found = []
    for cell in getattr(func, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, torch.Tensor) and value.requires_grad:
            found.append(value)
        elif isinstance(value, nn.Module) and any(p.requires_grad for p in value.parameters()):
            found.append(value)
        elif callable(value) and depth > 1 and not isinstance(value, type):
            found.extend(_closed_over(value, True, depth - 1))
    return found
