"""The plain-PyTorch backend ("eager"): the kernels' contract (same
arguments, same outputs) computed with torch ops from ``rlhf_kernels.reference``.
It runs wherever no kernel is built, and on devices no kernel serves."""
