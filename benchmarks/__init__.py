"""taskguard's benchmarks against its peers: ``python -m benchmarks [--quick]``.

See docs/benchmarks.md for the cases, the targets and the latest figures.
"""
