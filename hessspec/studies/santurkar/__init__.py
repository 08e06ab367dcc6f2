"""Santurkar et al. 2018: how BatchNorm smooths the loss landscape."""
