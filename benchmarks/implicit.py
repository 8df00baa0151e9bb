"""Implicit methods against rk4: a training step of the ODE-Net block with cn and beuler.

Rows, each in its own process (:mod:`benchmarks.measure`), ratios from this one run: pnode on the
ODE-Net block at each of ``--steps`` (default 16) fixed steps with ``rk4`` (pnode's defaults),
``cn`` and ``beuler`` (pnode's defaults, or the options of ``--options``). Besides time and
memory, each implicit row reports Newton iterations and Krylov iterations per step of the forward
solve (PETSc's counts), VJPs per step of the adjoint (one per Krylov iteration of its transposed
solves, plus those of the explicit and parameter terms), the Newton and Krylov tolerances the TS
ran with (read back from PETSc), and the gradient error against autograd through the same implicit
steps solved to round-off (:mod:`pnode.testing.references`).

Writes ``implicit.json``, ``implicit.md`` (printed too) and ``implicit-time.png`` (time per
training step against the number of steps) to ``--out``::

    python -m benchmarks.implicit
    python -m benchmarks.implicit --steps 4,16,64 --options '{"snes_rtol": 1e-4}'
    python -m benchmarks.implicit --quick --out /tmp/b
"""

import json
from typing import List, Mapping, Optional, Sequence

from benchmarks import cli
from benchmarks.measure import Row, run_rows

EXPLICIT = "rk4"
IMPLICIT = ("cn", "beuler")


def rows_for(steps: Sequence[int], implicit_options: Mapping[str, object]) -> List[Row]:
    rows = []
    for n in steps:
        rows.append(Row("odenet", "pnode", EXPLICIT, n))
        rows += [Row("odenet", "pnode", method, n, options=dict(implicit_options)) for method in IMPLICIT]
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = cli.arguments(argv)
    parser = cli.new_parser(__doc__)
    parser.add_argument("--steps", type=cli.int_list, default=[16],
                        metavar="N,N,...", help="fixed step counts over [0, 1] (default 16)")
    parser.add_argument("--options", type=json.loads, default={}, metavar="JSON",
                        help="pnode options of the implicit rows, e.g. '{\"snes_rtol\": 1e-6}' (default: none, "
                             "pnode's own defaults)")
    args = parser.parse_args(argv)
    rows = cli.select(rows_for(args.steps, args.options), args.rows)
    if not cli.listed(args, rows):
        settings = cli.settings_from(args)
        cli.finish("implicit", settings, run_rows(rows, settings), argv, args.out)


if __name__ == "__main__":
    main()
