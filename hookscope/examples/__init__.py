"""Small example models for the demo, the docs and the tests (no downloads, CPU-sized)."""
