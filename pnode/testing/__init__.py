"""Support for pnode's tests and benchmarks: independent references and the networks they integrate.

Not part of pnode's public API (``import pnode`` does not import it); tests and benchmarks import
it as ``pnode.testing``, so there is one copy of each reference:

* :mod:`pnode.testing.references`: hand-written Butcher tableaus and implicit steps integrated in
  torch, whose autograd is "backprop through the same steps".
* :mod:`pnode.testing.petsc_arithmetic`: explicit RK steps rounded exactly as PETSc rounds them.
* :mod:`pnode.testing.networks`: the ODE-Net block and the small MLP of the benchmarks.
"""
