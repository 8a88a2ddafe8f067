"""Benchmarks of rlhf_kernels: ``python -m benchmarks <name>`` (see __main__)."""
