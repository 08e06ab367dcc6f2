"""Curvature operators of a loss: Hessian and Gauss-Newton operators of a dataset-mean loss
(whole or one block of parameters), sharded over devices; the convolution layout rewrite
for XLA:CPU; multi-process set-up.

No flax, optax, matplotlib or file I/O: a loss is any ``loss_fn(params, batch)``.
"""
