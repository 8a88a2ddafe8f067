"""The Triton backend: one module per op family (logprobs, ppo_loss,
advantages), each with its ``@triton.jit`` kernels and their launchers;
``_device`` holds the jitted helpers they share. Importing it needs Triton;
``rlhf_kernels._dispatch`` imports it only when Triton is installed."""
