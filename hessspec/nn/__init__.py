"""Networks: models (flax nnx), objectives with an explicit BatchNorm mode, data loaders and
the one optax training loop.
"""
