"""Triton kernels for BERT's hot paths. One op per module; each has a plain-PyTorch `*_ref` beside it.

This package knows nothing of BERT models: `fastbert` composes these ops into layers.
"""
