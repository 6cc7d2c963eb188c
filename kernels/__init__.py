"""numba int8 kernels for the plaintext fast path (see the kernels issue)."""
