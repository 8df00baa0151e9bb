from setuptools import find_packages, setup

setup(
    name="pnode",
    version="0.1.0",
    description="Neural ODEs for PyTorch with PETSc TS/TSAdjoint: reverse-accurate gradients, "
    "checkpointing, implicit solvers and MPI",
    packages=find_packages(include=["pnode", "pnode.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=1.10", "numpy"],
    extras_require={
        "petsc": ["petsc4py>=3.18", "mpi4py"],
        "test": ["pytest>=7", "scipy", "scikit-learn", "matplotlib", "tqdm", "torchdiffeq==0.2.5", "pandas", "h5py"],
        # pandas and h5py read the CNF example's tabular sets (GAS, HEPMASS; BSDS300)
        "examples": ["scipy", "scikit-learn", "matplotlib", "tqdm", "pandas", "h5py"],
    },
)
