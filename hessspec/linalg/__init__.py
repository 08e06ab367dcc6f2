"""Matrix-free linear algebra in pure JAX: linear operators, the Krylov engine, Lanczos
eigenpairs, stochastic Lanczos quadrature, Hutch++ traces and memory estimates.

No flax, optax, matplotlib or file I/O: everything here works on any ``matvec``.
"""
