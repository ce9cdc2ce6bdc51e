"""Triton kernels of ddps, installed as ``ddps.kernels`` (never a top-level ``kernels`` module).

Importing this package does not import Triton; each kernel module does, when first used.
"""
