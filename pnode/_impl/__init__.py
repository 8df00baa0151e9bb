"""pnode's internals: the modules behind the public API of :mod:`pnode`.

Not a public interface: names here change without notice. Users import :mod:`pnode` (the solvers,
``ODEBlock``, ``IMEX``, the errors), :mod:`pnode.distributed` (MPI helpers), :mod:`pnode.allocator`
(the memory allocator's trim) and, for tests and benchmarks, :mod:`pnode.testing`.
docs/architecture.md shows the path of a call through these modules.
"""
