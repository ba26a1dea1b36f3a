"""Developer and setup tools (not stages): e.g. ``python -m tools.sample_corpus``."""
