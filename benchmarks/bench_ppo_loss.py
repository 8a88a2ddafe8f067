"""Benchmark the fused PPO losses against the eager formulation (verl / OpenRLHF,
``rlhf_kernels.reference``), ``torch.compile`` of that reference, and Liger's
``triton_grpo_loss`` where installed (GPU only).

    python -m benchmarks.bench_ppo_loss            # full shapes (1M tokens; N = 8192, V = 152064 on GPU)
    python -m benchmarks.bench_ppo_loss --quick    # tiny shapes, a smoke run

Forward and forward+backward are timed separately; each result is appended as
one JSON line under benchmarks/results/ (or --out-dir) and printed as a table.
Minimal bytes: the token losses read 3 float32 tensors and the mask and (with
backward) write one float32 gradient; the loss from logits reads the logits
once forward, and forward+backward reads them once and writes their gradient
once (the gradient is produced during the forward, while each row is cached).
The backward of the loss from logits is autograd.grad with respect to the
op's input (the shifted-logits view), so no slice backward is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


from benchmarks.common import (
    RESULTS_DIR, Result, copy_bandwidth_gbps, environment, is_quick, peak_memory_gpu, print_table,
    progress, time_fn, time_interleaved, write_results,
)

import rlhf_kernels  # noqa: E402
from rlhf_kernels import reference  # noqa: E402

POLICY_KW = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="token-mean")
LOGITS_KW = dict(temperature=0.9, clip_low=0.2, clip_high=0.4, agg="token-mean", kl_coef=0.04, kl_estimator="k3")


def _token_inputs(shape, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    logp = (-torch.rand(shape, generator=gen) * 3).to(device)
    old = (logp.cpu() + torch.randn(shape, generator=gen) * 0.3).to(device)
    adv = torch.randn(shape, generator=gen).to(device)
    mask = (torch.rand(shape, generator=gen) > 0.1).to(device)
    return logp, old, adv, mask


def _logits_inputs(shape, dtype, device):
    B, T, V = shape
    gen = torch.Generator(device="cpu").manual_seed(1)
    # T + 1 positions, as an LM emits; the loss reads logits[:, :-1] in place.
    logits = (torch.randn(B, T + 1, V, generator=gen) * 2).to(dtype).to(device)
    labels = torch.randint(0, V, (B, T), generator=gen).to(device)
    old = (-torch.rand(B, T, generator=gen) * 5 - 8).to(device)
    ref = old + 0.1
    adv = torch.randn(B, T, generator=gen).to(device)
    mask = (torch.rand(B, T, generator=gen) > 0.1).to(device)
    return logits, labels, old, ref, adv, mask


def _backends(device: torch.device, quick: bool) -> list[str]:
    names = [b for b in rlhf_kernels.available_backends() if b != "eager"]
    if device.type == "cpu":
        # The Triton interpreter is a correctness tool: only in the smoke run.
        names = [b for b in names if b == "cpu" or (quick and b == "triton")]
    else:
        names = [b for b in names if b in ("cuda", "triton")]
    return names


ROWS_ENV = "RLHF_KERNELS_ROWS_IN_FLIGHT"


def _timed(fn, device, leaves, grad_of=None):
    """(fwd timing, fwd+bwd timing) of fn() -> loss. With grad_of, the backward
    is autograd.grad(loss, grad_of): the gradient of the op's own input, with
    no slice backward or .grad accumulation of a leaf in the timing."""
    def forward():
        with torch.no_grad():
            fn()

    def setup():
        for leaf in leaves:
            leaf.grad = None

    def forward_backward():
        if grad_of is None:
            fn().backward()
        else:
            torch.autograd.grad(fn(), grad_of)

    return time_fn(forward, device), time_fn(forward_backward, device, setup=setup)


def bench_token_losses(device, quick, compile_ref, copy_gbps):
    shapes = [(4, 64)] if quick else [(1024, 1024)]  # 1M tokens
    rows = []
    for shape in shapes:
        logp, old, adv, mask = _token_inputs(shape, device)
        n = logp.numel()
        for op in ("ppo_policy_loss", "ppo_value_loss"):
            leaf = logp.clone().requires_grad_(True)
            if op == "ppo_policy_loss":
                eager = lambda: reference.ppo_policy_loss(leaf, old, adv, mask, **POLICY_KW)[0]  # noqa: E731
                ours = lambda b: (lambda: rlhf_kernels.ppo_policy_loss(leaf, old, adv, mask, backend=b, **POLICY_KW)[0])  # noqa: E731
            else:
                eager = lambda: reference.ppo_value_loss(leaf, old, adv, mask, clip=0.2)[0]  # noqa: E731
                ours = lambda b: (lambda: rlhf_kernels.ppo_value_loss(leaf, old, adv, mask, clip=0.2, backend=b)[0])  # noqa: E731
            providers = {"eager": eager}
            if compile_ref:
                providers["torch.compile"] = torch.compile(eager)
            for backend in _backends(device, quick):
                providers[f"rlhf_kernels:{backend}"] = ours(backend)
            for provider, fn in providers.items():
                progress(f"{op} {shape} {provider}")
                fwd, fwd_bwd = _timed(fn, device, [leaf])
                for mode, timing, nbytes in (("fwd", fwd, 13 * n), ("fwd+bwd", fwd_bwd, 17 * n)):
                    rows.append(Result(op, provider, mode, list(shape), "float32", timing, nbytes, copy_gbps))
    return rows


# The objectives of loss_type against verl's functions of the same names (the
# goal: fused forward + backward at 1M tokens >= 5x verl's eager function).
# verl's config and our keywords for the same loss (verl's sapo aggregates by
# seq-mean-token-mean whatever it is given).
OBJECTIVES = {
    "clip": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0),  # verl's "vanilla" (its dual clip is always on)
    "cispo": dict(clip_low=0.2, clip_high=0.28),
    "sapo": dict(tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean"),
    "gpg": {},
    "dppo_tv": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    "dppo_kl": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    "dro": dict(dro_beta=0.3),
    "geo_mean": dict(clip_low=0.2, clip_high=0.28, agg="seq-mean-token-mean"),  # verl's mean over sequences
    # TRL's GRPO losses (no verl function): TRL's own lines are the peer
    "luspo": dict(clip_low=0.2, clip_high=0.28, agg="seq-mean-token-sum"),
    "vespo": {},
}


def _trl_objective(name: str):
    """TRL 1.16's GRPO loss ``name`` as GRPOTrainer._compute_loss writes it
    (its per-token lines, VESPO's weight by TRL's own get_gamma_weights),
    eagerly, or None."""
    if name not in ("luspo", "vespo"):
        return None
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer
    except Exception:  # noqa: BLE001 -- TRL or one of its dependencies missing
        return None

    def loss(logp, old, adv, mask):
        log_ratio = logp - old
        if name == "vespo":
            phi = GRPOTrainer.get_gamma_weights(adv, log_ratio, mask, None)
            return ((-phi * adv * logp) * mask).sum() / mask.sum().clamp(min=1.0)
        coef_1 = torch.exp(((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1))
        kw = OBJECTIVES["luspo"]
        coef_2 = torch.clamp(coef_1, 1 - kw["clip_low"], 1 + kw["clip_high"])
        return (-torch.min(coef_1 * adv, coef_2 * adv) * mask).sum(-1).mean()

    return loss


def _verl_objective(name: str):
    """verl's own (unpatched) policy loss ``name`` with its config, or None."""
    try:
        from verl.trainer.ppo import core_algos
        from verl.workers.config import FSDPActorConfig, PolicyLossConfig
    except Exception:  # noqa: BLE001 -- verl or one of its dependencies missing
        return None
    config = FSDPActorConfig(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                             strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1,
                             tau_pos=1.0, tau_neg=1.05, policy_loss=PolicyLossConfig(dro_beta=0.3),
                             global_batch_info={})
    try:
        fn = core_algos.get_policy_loss_fn("vanilla" if name == "clip" else name)
    except (KeyError, ValueError):  # not one of verl's (TRL's luspo, vespo)
        return None
    fn = getattr(fn, "__wrapped_original__", fn)
    return lambda logp, old, adv, mask: fn(old, logp, adv, mask, "token-mean", config)[0]


def bench_objectives(device, quick, copy_gbps, names=tuple(OBJECTIVES)):
    """Each objective's forward and forward + backward against verl's function
    (TRL's lines for luspo / vespo); on the CPU round-robin
    (common.time_interleaved: the peer and ours in turn)."""
    shape = (4, 64) if quick else (1024, 1024)  # 1M tokens
    logp, old, adv, mask = _token_inputs(shape, device)
    fmask = mask.float()
    n = logp.numel()
    rows = []
    for name in names:
        kw = OBJECTIVES[name]
        leaf = logp.clone().requires_grad_(True)
        providers = {}
        verl_fn = _verl_objective(name)
        if verl_fn is not None:
            providers["verl"] = lambda f=verl_fn: f(leaf, old, adv, fmask)
        trl_fn = _trl_objective(name)
        if trl_fn is not None:
            providers["trl"] = lambda f=trl_fn: f(leaf, old, adv, fmask)
        for backend in _backends(device, quick):
            providers[f"rlhf_kernels:{backend}"] = (
                lambda b=backend, k=kw, t=name: rlhf_kernels.ppo_policy_loss(leaf, old, adv, mask, loss_type=t,
                                                                            backend=b, **k)[0])
        progress(f"policy_loss:{name} {shape} {', '.join(providers)}")
        if device.type == "cpu":
            def fwd_bwd(fn):
                def run():
                    leaf.grad = None
                    fn().backward()
                return run

            def fwd(fn):
                def run():
                    with torch.no_grad():
                        fn()
                return run

            rounds = 3 if quick else 20
            timings = {"fwd": time_interleaved({p: fwd(f) for p, f in providers.items()}, rounds),
                       "fwd+bwd": time_interleaved({p: fwd_bwd(f) for p, f in providers.items()}, rounds)}
        else:
            timings = {"fwd": {}, "fwd+bwd": {}}
            for provider, fn in providers.items():
                timings["fwd"][provider], timings["fwd+bwd"][provider] = _timed(fn, device, [leaf])
        for mode, nbytes in (("fwd", 13 * n), ("fwd+bwd", 17 * n)):
            for provider, timing in timings[mode].items():
                rows.append(Result(f"policy_loss:{name}", provider, mode, list(shape), "float32", timing, nbytes,
                                   copy_gbps))
    return rows


def _liger():
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return triton_grpo_loss


def bench_loss_from_logits(device, quick, compile_ref, copy_gbps):
    if quick:
        configs = [((2, 8, 128), torch.float32)]
    elif device.type == "cuda":
        configs = [((1, 8192, 152064), torch.bfloat16)]
    else:
        configs = [((1, 512, 32000), torch.float32)]
    rows = []
    for shape, dtype in configs:
        logits, labels, old, ref, adv, mask = _logits_inputs(shape, dtype, device)
        leaf = logits.clone().requires_grad_(True)
        inp = leaf[:, :-1]  # the shifted logits every trainer passes: a strided view
        n_bytes = shape[0] * shape[1] * shape[2] * logits.element_size()

        def eager():
            return reference.ppo_loss_from_logits(inp, labels, old, adv, mask, ref_logp=ref, **LOGITS_KW)[0]

        providers = {"eager": eager}
        if compile_ref:
            providers["torch.compile"] = torch.compile(eager)
        rows_env = {}  # provider -> RLHF_KERNELS_ROWS_IN_FLIGHT while it is timed
        for backend in _backends(device, quick):
            fn = (lambda b: lambda: rlhf_kernels.ppo_loss_from_logits(
                inp, labels, old, adv, mask, ref_logp=ref, backend=b, **LOGITS_KW)[0])(backend)
            providers[f"rlhf_kernels:{backend}"] = fn
            if device.type == "cuda" and not quick:
                # The rows in flight of the fused kernels (their second read of a
                # row should hit L2): the default's prediction against a sweep.
                sms = torch.cuda.get_device_properties(device).multi_processor_count
                for rows in (sms, 2 * sms, 4 * sms, shape[0] * (shape[1] - 1)):
                    name = f"rlhf_kernels:{backend}@rows={rows}"
                    providers[name] = fn
                    rows_env[name] = str(rows)
        liger = _liger() if device.type == "cuda" else None
        if liger is not None:
            def liger_fn():
                out = liger(leaf, old, ref, labels, adv, mask, temperature=LOGITS_KW["temperature"],
                            beta=LOGITS_KW["kl_coef"], eps_low=0.2, eps_high=0.4, inplace=False)
                loss = out[0] if isinstance(out, tuple) else out
                if loss.dim() > 0:  # per-token losses in older Liger versions
                    loss = (loss * mask).sum() / mask.sum().clamp(min=1)
                return loss
            providers["liger:triton_grpo_loss"] = liger_fn
        for provider, fn in providers.items():
            progress(f"ppo_loss_from_logits {shape} {provider}")
            wrt = leaf if provider.startswith("liger") else inp
            saved = os.environ.get(ROWS_ENV)
            if provider in rows_env:
                os.environ[ROWS_ENV] = rows_env[provider]
            try:
                fwd, fwd_bwd = _timed(fn, device, [leaf], grad_of=wrt)
                peak = None
                if device.type == "cuda":
                    peak = peak_memory_gpu(lambda: torch.autograd.grad(fn(), wrt), device)
            finally:
                if saved is None:
                    os.environ.pop(ROWS_ENV, None)
                else:
                    os.environ[ROWS_ENV] = saved
            for mode, timing, nbytes in (("fwd", fwd, n_bytes), ("fwd+bwd", fwd_bwd, 2 * n_bytes)):
                rows.append(Result("ppo_loss_from_logits", provider, mode, list(shape), str(dtype).replace("torch.", ""),
                                   timing, nbytes, copy_gbps, peak_mem_bytes=peak if mode == "fwd+bwd" else None,
                                   input_bytes=n_bytes))
    return rows


def _speedups(rows: list[dict]) -> None:
    """Adds speedup_vs_eager to each row (same op, mode, shape): against the
    eager reference, or verl's own function for the objectives (TRL's lines
    for luspo / vespo)."""
    eager = {(r["op"], r["mode"], tuple(r["shape"])): r["median_ms"] for r in rows
             if r["provider"] in ("eager", "verl", "trl")}
    for r in rows:
        base = eager.get((r["op"], r["mode"], tuple(r["shape"])))
        r["speedup_vs_eager"] = round(base / r["median_ms"], 2) if base and r["median_ms"] > 0 else None


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip torch.compile of the reference (always skipped with --quick: compile time)")
    parser.add_argument("--ops", default="tokens,logits,objectives",
                        help="comma list of: tokens, logits, objectives")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES),
                        help="with --ops objectives: comma list of loss types (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (a shared machine times more steadily with 1)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick or is_quick()
    device = torch.device(args.device)
    compile_ref = not (args.no_compile or quick)
    env = environment(device)
    copy_gbps = copy_bandwidth_gbps(device, nbytes=(1 << 22) if quick else (1 << 30))
    results: list[Result] = []
    ops = set(args.ops.split(","))
    if "tokens" in ops:
        results += bench_token_losses(device, quick, compile_ref, copy_gbps)
    if "logits" in ops:
        results += bench_loss_from_logits(device, quick, compile_ref, copy_gbps)
    if "objectives" in ops:
        names = [n for n in args.objectives.split(",") if n]
        unknown = sorted(set(names) - set(OBJECTIVES))
        if unknown:
            parser.error(f"--objectives: unknown {unknown}; expected some of {list(OBJECTIVES)}")
        results += bench_objectives(device, quick, copy_gbps, names)
    rows = [r.record(env) for r in results]
    _speedups(rows)
    path = write_results(rows, env, args.out_dir)
    print_table(rows)
    for r in rows:
        if r["speedup_vs_eager"] is not None and r["provider"] not in ("eager", "verl", "trl"):
            print(f"{r['op']:22s} {r['mode']:8s} {r['provider']:24s} {r['median_ms']:9.3f} ms  x{r['speedup_vs_eager']}")
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()
