"""Fast paths (BLAS, Numba) for the ops in :mod:`refghost.ops`; filled in by refghost.kernels modules."""
