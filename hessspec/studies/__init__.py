"""Studies: shared plumbing (config, run folder, checkpoints, interrupts) and the
experiments built on it (batchnorm_spectrum, input_bias, santurkar).
"""
