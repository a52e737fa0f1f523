"""Data, models and tokenizers the benchmarks (and some tests and examples) build: nothing here is hf_ext's API."""
