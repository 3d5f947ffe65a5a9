"""Benchmark: the generated service against bare FastAPI (see README.md, Benchmark)."""
