"""Side-by-side benchmarks of hf_ext against the library implementations it replaces.

Each module is one benchmark (``python -m benchmarks.NAME [--quick]``); ``harness`` is what they share, ``tasks/``
holds the data and model builders. ``python -m benchmarks`` lists them. Results: ``benchmarks/RESULTS.md``.
"""
