"""What a spectrum means: outlier/bulk split, gradient energy in the top eigenspace,
subspace overlap, block (per-layer) spectra, landscape smoothness and input-statistics
theory.
"""
