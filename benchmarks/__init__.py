"""pnode's benchmarks: time and peak memory of a training step against torchdiffeq, and gradient errors.

* :mod:`benchmarks.workloads`: the workloads (network, data, time span) and one training step;
* :mod:`benchmarks.measure`: rows (one solver configuration each), measured each in a fresh process;
* :mod:`benchmarks.memory`: resident memory and its peak during a step;
* the gradient references (autograd through the same steps) and the networks: :mod:`pnode.testing`;
* :mod:`benchmarks.report`: results (JSON) rendered as markdown tables and figures.

Entry points: ``python -m benchmarks.strategies`` (adjoint strategies and memory budgets against
torchdiffeq's two modes) and ``python -m benchmarks.implicit`` (cn and beuler against rk4); both
take ``--quick`` for a smoke run and ``--help``. ``python -m benchmarks.report FILE.json``
re-renders a run's tables and figures without running anything.
"""
