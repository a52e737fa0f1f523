"""Runnable showcases of hf_ext, run from a checkout of the repository: `python -m examples.NAME --help`."""
