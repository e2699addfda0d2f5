"""Triton kernels of the perturbation, one family per file, each with its launcher.

``_philox``: Philox draws (coefficients, noise) matching :mod:`diffeo_engine.rng`;
``field``: sine tables and the separable field of a tile; ``warp``: clamp, bilinear /
nearest sampling and dtype-aware stores; ``fused``: the kernels; ``perturb``: their launcher.
Imported lazily by :mod:`diffeo_engine.ops`, so the reference works without Triton.
"""
