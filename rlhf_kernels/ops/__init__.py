"""One module per public op: Triton kernels, launchers, custom-op registration,
autograd rule and the public function, top to bottom."""
