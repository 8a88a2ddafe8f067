"""Shared test helpers: tolerances and the bf16/fp16 accuracy rule."""

import torch

# (dtype, atol, rtol) for results computed with float32 accumulation from
# inputs of that dtype, compared with float64 on the same (rounded) inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-5),
}


def assert_close_to_reference(got, want64, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want64, atol=atol, rtol=rtol, equal_nan=True)


def assert_no_worse_than_torch(got, want64, torch_same_dtype, factor=2.0, floor=1e-6):
    """flash-attention's rule for low-precision inputs: the kernel's max error
    against float64 is at most `factor` times the error of the same computation
    done by PyTorch in the input dtype (plus a tiny floor for exact cases)."""
    kernel_err = (got.double() - want64).abs().max().item()
    torch_err = (torch_same_dtype.double() - want64).abs().max().item()
    assert kernel_err <= factor * torch_err + floor, (kernel_err, torch_err)
