"""Benchmarks, run from the repository root: ``python -m benchmarks.block``, ``python -m benchmarks.compare``,
``bash benchmarks/gpu.sh``. Each prints tables of measurements taken side by side in one run."""
