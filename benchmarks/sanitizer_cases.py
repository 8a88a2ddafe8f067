"""Every op once per case on small shapes: the driver compute-sanitizer runs under.

    compute-sanitizer --tool memcheck  python -m benchmarks.sanitizer_cases             # CUDA kernels
    compute-sanitizer --tool racecheck python -m benchmarks.sanitizer_cases
    python -m benchmarks.sanitizer_cases --device cpu                                    # the C++ kernels

Shapes are odd (tails in every block), rows are strided (``logits[:, :-1]``),
masks have holes and all-masked rows, packed layouts have empty sequences;
forward and backward both run. Results are checked loosely against the
reference (a sanitizer run is about memory and races; the test suite checks
values), so a wrong answer still fails the run.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import rlhf_kernels
from rlhf_kernels import reference


def _close(got, want, what, tol=1e-3):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.allclose(got, want, atol=tol, rtol=tol, equal_nan=True):
        raise AssertionError(f"{what}: max error {(got - want).abs().max().item():.3g}")


def cases(device: torch.device, backend: str):
    """(name, fn) pairs; each fn runs one op forward (and backward) on `device`."""
    gen = torch.Generator().manual_seed(0)
    dev = lambda t: t.to(device)  # noqa: E731

    def logprobs(shape, dtype, strided, inplace):
        def run():
            full = (torch.randn(*shape[:-1], shape[-1], generator=gen) * 3).to(dtype)
            rows = shape[:-1]
            labels = torch.randint(0, shape[-1], (rows[0], rows[1] - 1) if strided else rows, generator=gen)
            labels.view(-1)[0] = -100
            leaf = dev(full).requires_grad_(True)
            base = leaf * 1 if inplace else leaf
            x = base[:, :-1] if strided else base
            logp, ent = rlhf_kernels.logprobs_from_logits(x, dev(labels), temperature=0.7, return_entropy=True,
                                                          inplace_backward=inplace, backend=backend)
            (logp.sum() + ent.sum()).backward()
            want = reference.logprobs_from_logits((full[:, :-1] if strided else full).double(), labels,
                                                  temperature=0.7)
            _close(logp, want, "logp")
        return run

    def kl(shape):
        def run():
            logp = dev(-torch.rand(shape, generator=gen) * 3).requires_grad_(True)
            ref = dev(-torch.rand(shape, generator=gen) * 3).requires_grad_(True)
            for est in ("k1", "abs", "k2", "k3"):
                out = rlhf_kernels.kl_penalty(logp, ref, estimator=est, backend=backend)
                out.sum().backward()
                _close(out, reference.kl_penalty(logp.detach().cpu(), ref.detach().cpu(), est), f"kl {est}")
        return run

    def advantages(shape, packed):
        def run():
            cu = None
            if packed:
                lens = [0, 5, 1, 130, 0, 33]
                cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
                n, b = sum(lens), len(lens)
                mask = torch.rand(n, generator=gen) > 0.2
                kw = dict(cu_seqlens=dev(cu))
                tshape = (n,)
            else:
                b, _ = shape
                mask = torch.rand(shape, generator=gen) > 0.2
                mask[min(1, b - 1)] = False  # an all-masked row
                kw = {}
                tshape = shape
            values, rewards = torch.randn(tshape, generator=gen), torch.randn(tshape, generator=gen)
            logp, ref = -torch.rand(tshape, generator=gen), -torch.rand(tshape, generator=gen)
            adv, ret = rlhf_kernels.compute_gae(dev(rewards), dev(values), dev(mask), gamma=0.99, lam=0.95,
                                                backend=backend, **kw)
            want_adv, want_ret = reference.compute_gae(rewards, values, mask, gamma=0.99, lam=0.95,
                                                       cu_seqlens=cu if packed else None)
            _close(ret, want_ret, "returns")
            out = rlhf_kernels.ppo_advantages(dev(torch.randn(b, generator=gen)), dev(logp), dev(ref), dev(values),
                                              dev(mask), kl_coef=dev(torch.tensor(0.05)), estimator="k3",
                                              backend=backend, **kw)
            assert torch.isfinite(out.advantages).all()
        return run

    def token_losses(shape):
        def run():
            logp = -torch.rand(shape, generator=gen) * 3
            old = logp + torch.randn(shape, generator=gen) * 0.3
            adv = torch.randn(shape, generator=gen)
            mask = torch.rand(shape, generator=gen) > 0.2
            x = dev(logp).requires_grad_(True)
            for agg in ("token-mean", "seq-mean-token-mean"):
                loss, _ = rlhf_kernels.ppo_policy_loss(x, dev(old), dev(adv), dev(mask), clip_high=0.28,
                                                       dual_clip=3.0, agg=agg, backend=backend)
                loss.backward()
                _close(loss, reference.ppo_policy_loss(logp, old, adv, mask, clip_high=0.28, dual_clip=3.0,
                                                       agg=agg)[0], f"policy {agg}")
                vloss, _ = rlhf_kernels.ppo_value_loss(x, dev(old), dev(adv), dev(mask), agg=agg, backend=backend)
                vloss.backward()
        return run

    def loss_from_logits(shape, dtype, inplace=False, rows_in_flight=None):
        def run():
            b, t, v = shape
            full = (torch.randn(b, t + 1, v, generator=gen) * 2).to(dtype)
            labels = torch.randint(0, v, (b, t), generator=gen)
            old = -torch.rand(b, t, generator=gen) * 5 - 5
            adv, mask = torch.randn(b, t, generator=gen), torch.rand(b, t, generator=gen) > 0.2
            leaf = dev(full).requires_grad_(True)
            if rows_in_flight is not None:  # blocks that take several rows in turn
                os.environ["RLHF_KERNELS_ROWS_IN_FLIGHT"] = str(rows_in_flight)
            try:
                loss, _ = rlhf_kernels.ppo_loss_from_logits(
                    leaf[:, :-1], dev(labels), dev(old), dev(adv), dev(mask), ref_logp=dev(old + 0.1),
                    kl_coef=0.1, entropy_coef=0.01, temperature=0.9, inplace_backward=inplace, backend=backend)
                loss.backward()
            finally:
                os.environ.pop("RLHF_KERNELS_ROWS_IN_FLIGHT", None)
        return run

    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [
        ("logprobs 5x123 float32", logprobs((5, 123), torch.float32, False, False)),
        ("logprobs 3x9x32003 bf16 strided rows", logprobs((3, 9, 32003), low, True, False)),
        ("logprobs 2x7x4099 strided rows, in-place backward", logprobs((2, 7, 4099), torch.float32, True, True)),
        ("logprobs 1x1", logprobs((1, 1), torch.float32, False, False)),
        ("kl_penalty 7x131", kl((7, 131))),
        ("advantages padded 5x1037", advantages((5, 1037), False)),
        ("advantages padded 1x1", advantages((1, 1), False)),
        ("advantages packed, empty sequences", advantages(None, True)),
        ("policy/value loss 3x517", token_losses((3, 517))),
        ("policy/value loss 1x1", token_losses((1, 1))),
        ("loss from logits 2x5x1003 strided", loss_from_logits((2, 5, 1003), torch.float32)),
        ("loss from logits 1x3x32003 bf16 strided", loss_from_logits((1, 3, 32003), low)),
        ("loss from logits 2x4x517 in-place backward", loss_from_logits((2, 4, 517), torch.float32, True)),
        ("loss from logits 3x5x700, 2 rows in flight", loss_from_logits((3, 5, 700), torch.float32, False, 2)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backend", default=None, help="default: cuda on cuda, cpu on cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backend = args.backend or ("cuda" if device.type == "cuda" else "cpu")
    if backend not in rlhf_kernels.available_backends():
        print(f"backend {backend!r} not available here (have {rlhf_kernels.available_backends()})", file=sys.stderr)
        return 2
    failed = 0
    for name, run in cases(device, backend):
        try:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"ok    {name}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every case, then fail
            failed += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}", flush=True)
    print(f"{failed} of the cases failed" if failed else f"all cases ran on {device.type} / {backend}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
