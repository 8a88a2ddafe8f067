"""One module per op family (logprobs, ppo_loss, advantages): the public
functions (docstrings, argument checks) and the registered ops they call once
each: the native ops' fake kernels and autograd, the Triton twins' custom ops.
The kernels themselves live in rlhf_kernels/triton, csrc/cpu and csrc/cuda;
the plain-PyTorch backend in rlhf_kernels/eager."""
