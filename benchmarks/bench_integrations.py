"""Patched vs unpatched framework functions, wall clock on the current device
(CPU here): median of 9 calls after one warm-up. Needs trl and verl installed;
OpenRLHF's losses are timed only where openrlhf.models imports (flash-attn).

    python -m benchmarks.bench_integrations

A quick comparison for the README, not yet in the JSON-lines format of the
other benchmarks.
"""
import time, statistics, torch, numpy as np
torch.manual_seed(0)
import rlhf_kernels.integrations.trl as rt, rlhf_kernels.integrations.verl as rv
import trl.trainer.utils as tu, verl.trainer.ppo.core_algos as core, verl.utils.torch_functional as vf
def bench(fn, reps=9):
    fn(); ts=[]
    for _ in range(reps):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e3
B,T,V=4,256,32000
logits=torch.randn(B,T,V); labels=torch.randint(0,V,(B,T))
def fb(f):
    def g():
        x=logits.clone().requires_grad_(); y=f(x); y.sum().backward()
    return g
rows=[]
def pair(name, getter, make):
    a=bench(make(getter()))
    with (rt if name.startswith("TRL") else rv).patched():
        b=bench(make(getter()))
    rows.append((name,a,b)); print(f"{name}: {a:.1f} ms -> {b:.1f} ms ({a/b:.1f}x)", flush=True)
pair("TRL selective_log_softmax fwd", lambda: tu.selective_log_softmax, lambda f: (lambda: f(logits, labels)))
pair("TRL selective_log_softmax fwd+bwd", lambda: tu.selective_log_softmax, lambda f: fb(lambda x: f(x, labels)))
pair("TRL entropy_from_logits fwd", lambda: tu.entropy_from_logits, lambda f: (lambda: f(logits)))
pair("verl logprobs_from_logits fwd+bwd", lambda: vf.logprobs_from_logits, lambda f: fb(lambda x: f(x, labels)))
pair("verl entropy_from_logits fwd", lambda: vf.entropy_from_logits, lambda f: (lambda: f(logits)))
Bg,Tg=64,1024
r=torch.randn(Bg,Tg); v=torch.randn(Bg,Tg); m=(torch.rand(Bg,Tg)>0.1).long()
pair("verl compute_gae_advantage_return", lambda: core.compute_gae_advantage_return, lambda f: (lambda: f(r,v,m,1.0,0.95)))
old=torch.randn(Bg,Tg); adv=torch.randn(Bg,Tg)
class C(dict):
    __getattr__=dict.get
cfg=C(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0, global_batch_info={})
def pl(f):
    def g():
        n=(old+0.1*torch.randn(Bg,Tg)).requires_grad_(); l,_=f(old,n,adv,m,"token-mean",cfg); l.backward()
    return g
pair("verl vanilla policy loss fwd+bwd", lambda: core.compute_policy_loss_vanilla, pl)
def al(f):
    def g():
        x=torch.randn(Bg,Tg).requires_grad_(); f(x,m,"seq-mean-token-mean").backward()
    return g
pair("verl agg_loss seq-mean-token-mean fwd+bwd", lambda: core.agg_loss, al)
# OpenRLHF's losses, where openrlhf.models imports (it needs flash-attn: a GPU machine).
try:
    import rlhf_kernels.integrations.openrlhf as ro, openrlhf.models.loss as ol
except Exception as exc:
    print(f"OpenRLHF PolicyLoss / ValueLoss: skipped (openrlhf.models does not import here: {exc})")
else:
    def pair_o(name, make):
        a=bench(make()); ro.patch(); b=bench(make()); ro.unpatch()
        print(f"{name}: {a:.1f} ms -> {b:.1f} ms ({a/b:.1f}x)", flush=True)
    def opl():
        loss=ol.PolicyLoss(dual_clip=3.0)
        def g():
            n=(old+0.1*torch.randn(Bg,Tg)).requires_grad_(); loss(n,old,adv,m)[0].backward()
        return g
    def ovl():
        loss=ol.ValueLoss(clip_eps=0.2)
        def g():
            x=(old+0.1*torch.randn(Bg,Tg)).requires_grad_(); loss(x,old,adv,m).backward()
        return g
    pair_o("OpenRLHF PolicyLoss fwd+bwd", opl)
    pair_o("OpenRLHF ValueLoss fwd+bwd", ovl)
