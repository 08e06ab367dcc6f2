"""Matrix-free linear algebra in pure JAX: linear operators, the Krylov engine, Lanczos
eigenpairs, stochastic Lanczos quadrature, Hutch++ traces and memory estimates.

No flax, optax, matplotlib or file I/O: everything here works on any ``matvec``.

Modules, bottom up: ``linop`` (:class:`~hessspec.linalg.linop.LinearOperator`, dtype rules),
``krylov`` (the one compiled matvec loop and its state), ``krylov_runner`` (the host side
that drives it: random vectors, restarts, reading results back), then the solvers on it:
``lanczos`` (top eigenpairs, tridiagonalization), ``density`` (SLQ), ``trace`` (Hutch++);
``memory`` estimates what a solver call needs before it starts.
"""
