"""The fused kernels of the perturbation, one family per backend, each with its launcher.

Triton (CUDA): ``_philox``, Philox draws (coefficients, noise) matching
:mod:`diffeo_engine.rng`; ``field``, sine tables and the separable field of a tile;
``warp``, clamp, bilinear / nearest sampling, dtype-aware stores and the finite check;
``fused``, the kernels; ``perturb``, their launcher. CPU: ``cpu``, the numba kernel and its
launcher. ``outputs``: the output buffers both launchers share. Imported lazily by
:mod:`diffeo_engine.ops`, so the reference works without Triton or numba.
"""
