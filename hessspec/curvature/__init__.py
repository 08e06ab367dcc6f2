"""Curvature operators of a loss: Hessian and Gauss-Newton operators of a dataset-mean loss
(whole or one block of parameters), sharded over devices; the convolution layout rewrite
for XLA:CPU; multi-process set-up.

No flax, optax, matplotlib or file I/O: a loss is any ``loss_fn(params, batch)``.

Modules: ``layout`` (parameters as one flat vector, ``wrt=`` blocks), ``batching`` (the data
cut into batches and placed on the devices, the batch-weighted sum), ``operators`` (the
Hessian, Gauss-Newton and dataset-gradient builders on those two), ``conv_layout``
(convolutions in canonical layout on CPU), ``distributed`` (``jax.distributed`` set-up).
"""
