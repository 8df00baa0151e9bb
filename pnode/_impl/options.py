"""PETSc options for one solver: what pnode derives, what the caller passes, what the command line says.

Precedence, highest first (each layer only fills what the layers above left unset):

1. the command line with the solver's prefix (``-block1_ts_type cn``),
2. the command line without a prefix (``-ts_type cn`` tunes every solver, prefixed or not),
3. PETSc options passed in ``options={...}`` (``{'ts_trajectory_type': 'basic'}``),
4. what pnode derives from ``method``, ``options['step_size']`` and friends.

Layers 3 and 4 are inserted into PETSc's options database only while the solver reads its options
(``TSSetFromOptions``), then removed, so they never leak into another solver.
"""

from contextlib import contextmanager
from typing import Dict, Iterator, List, Mapping

from .._compat import PETSc

# Option families a prefixed solver inherits from the unprefixed command line.
_INHERITED_FAMILIES = ("ts_", "snes_", "ksp_", "pc_", "mat_mffd_", "pnode_")


def option_value(value) -> str:
    """A Python value as PETSc option text (``True`` -> ``'true'``, ``None`` -> flag without value)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(option_value(v) for v in value)
    return str(value)


@contextmanager
def scoped_options(prefix: str, user_options: Mapping[str, object],
                   derived_options: Mapping[str, object]) -> Iterator[List[str]]:
    """Make the layered options visible in PETSc's database for the duration of the block.

    Yields the list of option names (with prefix, without the dash) that came from
    ``user_options``, so the caller can check that PETSc used them.
    """
    db = PETSc.Options()
    inserted: List[str] = []

    def put(name: str, value) -> None:
        if not db.hasName(name):
            db.setValue(name, option_value(value))
            inserted.append(name)

    if prefix:
        for name, value in _command_line_options(db).items():
            if name.startswith(_INHERITED_FAMILIES):
                put(prefix + name, value)
    user_names = [prefix + key for key in user_options]
    for key, value in user_options.items():
        put(prefix + key, value)
    for key, value in derived_options.items():
        put(prefix + key, value)
    try:
        yield user_names
    finally:
        for name in inserted:
            db.delValue(name)


@contextmanager
def without_command_line() -> Iterator[None]:
    """Hide the unprefixed command line's solver options (``-ts_type cn``, ...) for the block.

    For pnode's own probes of PETSc's behaviour, which must solve what they say (an explicit
    midpoint step) whatever the user's command line asks of the user's solvers."""
    db = PETSc.Options()
    hidden = {name: value for name, value in _command_line_options(db).items() if name.startswith(_INHERITED_FAMILIES)}
    for name in hidden:
        db.delValue(name)
    try:
        yield
    finally:
        for name, value in hidden.items():
            db.setValue(name, value)


def _command_line_options(db) -> Dict[str, str]:
    return {name.lstrip("-"): value for name, value in db.getAll().items()}


def command_line_names() -> List[str]:
    """The names of the options in PETSc's database (the command line), without the dash."""
    return list(_command_line_options(PETSc.Options()))


def get_global_option(name: str, default=None):
    """The value of ``-name`` in PETSc's database (command line), or ``default``."""
    db = PETSc.Options()
    return db.getString(name, default) if db.hasName(name) else default


def database_fingerprint() -> tuple:
    """Everything in PETSc's options database, hashable: solvers are rebuilt when it changes."""
    return tuple(sorted(PETSc.Options().getAll().items()))
