"""LeCun, Kanter & Solla 1991: input statistics and the Hessian's outlier."""
