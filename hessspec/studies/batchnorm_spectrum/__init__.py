"""The BatchNorm spectrum study: train networks with and without BatchNorm, analyse their
Hessians at checkpoints, report.
"""
