"""Patched vs unpatched framework functions, called as TRL, verl and OpenRLHF
call them (their default arguments, their mask dtypes: verl's and TRL's float
0/1 masks, verl's rollout IS weights, OpenRLHF's IS correction and GSPO), wall
clock on the current device: median of 9 calls after one warm-up, every case
in one process. Each patched case also reports how many calls our ops served
(``rlhf_kernels.integrations.report()``): a speed-up of ~1x with 0 served is
a hand-back, not a slow kernel.

    python -m benchmarks.bench_integrations [--quick] [--out-dir DIR]

One JSON line per (case, provider): provider "framework" (unpatched) or
"rlhf_kernels" (patched), with ``speedup`` (framework / patched) and
``served`` / ``handed_back`` on the patched row; a table on stdout. Needs trl
and verl; the OpenRLHF cases import openrlhf.models with the stand-ins of
``rlhf_kernels.integrations.stand_ins`` for flash-attn and vLLM, which
OpenRLHF imports at module level but these CPU paths never call.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, environment, progress, write_results


def median_ms(fn, reps: int = 9) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _import_openrlhf_losses():
    """openrlhf.models.loss, with stand-ins for flash-attn / vLLM where they are not installed."""
    from rlhf_kernels.integrations import stand_ins

    stand_ins.install()
    return importlib.import_module("openrlhf.models.loss")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    import trl.trainer.utils as tu
    import verl.trainer.ppo.core_algos as core
    import verl.utils.torch_functional as vf

    import rlhf_kernels.integrations as integrations
    import rlhf_kernels.integrations.openrlhf as ro
    import rlhf_kernels.integrations.trl as rt
    import rlhf_kernels.integrations.verl as rv

    torch.manual_seed(0)
    B, T, V = (2, 64, 4096) if args.quick else (4, 256, 32000)
    Bg, Tg = (8, 128) if args.quick else (64, 1024)
    logits, labels = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    rewards, values = torch.randn(Bg, Tg), torch.randn(Bg, Tg)
    bool_mask = torch.rand(Bg, Tg) > 0.1
    float_mask = bool_mask.float()  # verl's response_mask, TRL's completion_mask dtype
    weights = torch.where(bool_mask, torch.rand(Bg, Tg) * 1.5 + 0.25, 0.0)  # fractional token weights
    old, adv = torch.randn(Bg, Tg) - 2, torch.randn(Bg, Tg)
    seq_adv = torch.randn(Bg, 1).expand(Bg, Tg).contiguous()  # GSPO / GRPO: one advantage per sequence
    is_weights = torch.rand(Bg, Tg) * 1.5 + 0.25  # verl rollout_is_weights (truncated IS)
    rollout_logp = old + 0.05 * torch.randn(Bg, Tg)

    from verl.workers.config import FSDPActorConfig

    # verl's actor config (its GSPO loss asserts a real one)
    cfg = FSDPActorConfig(clip_ratio=0.2, clip_ratio_c=3.0, strategy="fsdp", ppo_mini_batch_size=4,
                          ppo_micro_batch_size_per_gpu=2, rollout_n=1)

    def fwd_bwd_logits(f):
        def run():
            x = logits.clone().requires_grad_(True)
            f(x).sum().backward()
        return run

    def policy(f, mask, a=adv, **kw):
        def run():
            new = (old + 0.1 * torch.randn(Bg, Tg)).requires_grad_(True)
            f(old, new, a, mask, "token-mean", cfg, **kw)[0].backward()
        return run

    cases = [
        ("trl", "selective_log_softmax fwd", lambda: tu.selective_log_softmax, lambda f: lambda: f(logits, labels)),
        ("trl", "selective_log_softmax fwd+bwd", lambda: tu.selective_log_softmax,
         lambda f: fwd_bwd_logits(lambda x: f(x, labels))),
        ("trl", "entropy_from_logits fwd", lambda: tu.entropy_from_logits, lambda f: lambda: f(logits)),
        ("verl", "logprobs_from_logits fwd+bwd", lambda: vf.logprobs_from_logits,
         lambda f: fwd_bwd_logits(lambda x: f(x, labels))),
        ("verl", "entropy_from_logits fwd", lambda: vf.entropy_from_logits, lambda f: lambda: f(logits)),
        ("verl", "compute_gae_advantage_return float mask", lambda: core.compute_gae_advantage_return,
         lambda f: lambda: f(rewards, values, float_mask, 1.0, 0.95)),
        ("verl", "policy loss vanilla bool mask fwd+bwd", lambda: core.compute_policy_loss_vanilla,
         lambda f: policy(f, bool_mask)),
        ("verl", "policy loss vanilla float mask fwd+bwd", lambda: core.compute_policy_loss_vanilla,
         lambda f: policy(f, float_mask)),
        ("verl", "policy loss vanilla float mask + rollout_is_weights fwd+bwd",
         lambda: core.compute_policy_loss_vanilla, lambda f: policy(f, float_mask, rollout_is_weights=is_weights)),
        ("verl", "policy loss gspo float mask fwd+bwd", lambda: core.compute_policy_loss_gspo,
         lambda f: policy(f, float_mask, a=seq_adv)),
        ("verl", "value loss float mask fwd+bwd", lambda: core.compute_value_loss,
         lambda f: (lambda: f((values + 0.1 * torch.randn(Bg, Tg)).requires_grad_(True), rewards, values,
                              float_mask, 0.2, "token-mean")[0].backward())),
        ("verl", "agg_loss seq-mean-token-mean fractional weights fwd+bwd", lambda: core.agg_loss,
         lambda f: (lambda: f(torch.randn(Bg, Tg).requires_grad_(True), weights, "seq-mean-token-mean").backward())),
    ]
    try:
        ol = _import_openrlhf_losses()
    except Exception as exc:  # noqa: BLE001 - reported, the other cases still run
        progress(f"OpenRLHF cases skipped: openrlhf.models.loss does not import here ({type(exc).__name__}: {exc})")
    else:
        def o_policy(mask, a=adv, **kw):
            loss = ol.PolicyLoss(dual_clip=None if kw.get("policy_loss_type") == "gspo" else 3.0, **kw)

            def run():
                new = (old + 0.1 * torch.randn(Bg, Tg)).requires_grad_(True)
                loss(new, old, a, mask, rollout_logp)[0].backward()
            return run

        def o_value(mask):
            loss = ol.ValueLoss(clip_eps=0.2)

            def run():
                x = (values + 0.1 * torch.randn(Bg, Tg)).requires_grad_(True)
                loss(x, values, rewards, mask).backward()
            return run

        forward = lambda cls: lambda: cls.forward  # noqa: E731
        cases += [
            ("openrlhf", "PolicyLoss bool mask fwd+bwd", forward(ol.PolicyLoss), lambda f: o_policy(bool_mask)),
            ("openrlhf", "PolicyLoss float mask fwd+bwd", forward(ol.PolicyLoss), lambda f: o_policy(float_mask)),
            ("openrlhf", "PolicyLoss token IS correction (clip) fwd+bwd", forward(ol.PolicyLoss),
             lambda f: o_policy(bool_mask, is_correction_level="token", is_correction_mode="clip")),
            ("openrlhf", "PolicyLoss gspo fwd+bwd", forward(ol.PolicyLoss),
             lambda f: o_policy(bool_mask, a=seq_adv, policy_loss_type="gspo")),
            ("openrlhf", "ValueLoss float mask fwd+bwd", forward(ol.ValueLoss), lambda f: o_value(float_mask)),
        ]
    patchers = {"trl": rt, "verl": rv, "openrlhf": ro}
    env = environment(torch.device("cpu"))
    rows = []
    for framework, name, getter, make in cases:
        progress(f"{framework} {name}")
        base = median_ms(make(getter()))
        integrations.reset_report()
        with patchers[framework].patched():
            ours = median_ms(make(getter()))
            counts = integrations.report()
        served = sum(c["served"] for c in counts.values())
        handed_back = {f"{fn}: {reason}": n for fn, c in counts.items() for reason, n in c["handed_back"].items()}
        shape = [B, T, V] if "logits" in name or "log_softmax" in name else [Bg, Tg]
        for provider, ms in (("framework", base), ("rlhf_kernels", ours)):
            row = dict(env, op=f"{framework} {name}", provider=provider, mode="call", shape=shape, dtype="float32",
                       median_ms=ms)
            if provider == "rlhf_kernels":
                row.update(speedup=base / ours, served=served, handed_back=handed_back)
            rows.append(row)
        print(f"{framework:9s} {name:60s} {base:8.1f} ms -> {ours:8.1f} ms  {base / ours:5.2f}x  "
              f"served {served}{'  handed back ' + str(handed_back) if handed_back else ''}", flush=True)
    print(f"results: {write_results(rows, env, args.out_dir)}")
    return rows


if __name__ == "__main__":
    main()
