"""The PPO trainer on a tiny model (CPU): losses, parity with the reference
backend, PPO-ptx, checkpoint/resume, DDP on gloo, and the main job's claim."""

import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rlhf_kernels
from rlhf_kernels.trainer import pipeline
from rlhf_kernels.trainer.config import (
    ConfigError, OptimConfig, PPOConfig, RewardConfig, RolloutCorrectionConfig, SFTConfig, TrainConfig, load_config,
    to_dict,
)
from rlhf_kernels.trainer.data import IGNORE_INDEX, encode_prompts, encode_responses, lm_targets, make_batch
from rlhf_kernels.trainer.models import ScalarHeadModel, response_logits, tiny_llama
from rlhf_kernels.trainer.ppo import PPOTrainer
from rlhf_kernels.trainer.reward import pairwise_loss
from rlhf_kernels.trainer.sft import SFTTrainer
from rlhf_kernels.trainer.task import DigitTask, build_tokenizer

TIMING_KEYS = ("time", "timing/", "memory/", "tokens_per_s")


def tiny_config(out: Path, iterations: int = 4, **ppo) -> TrainConfig:
    cfg = TrainConfig(out=str(out))
    cfg.model_config.hidden_size = 32
    cfg.sft = SFTConfig(steps=30, batch_size=32)
    cfg.reward = RewardConfig(steps=10, prompts_per_batch=8)
    cfg.ppo = PPOConfig(iterations=iterations, rollout_batch_size=16, mini_batch_size=8, grad_accum_steps=2,
                        checkpoint_every=2, eval_prompts=32, **ppo)
    return cfg


def _parts(seed=0):
    tok = build_tokenizer()
    policy = tiny_llama(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, hidden_size=32, seed=seed)
    return tok, policy


def _ppo_trainer(backend=None, seed=0, **cfg):
    torch.manual_seed(seed)
    tok, policy = _parts(seed)
    task = DigitTask()
    value = ScalarHeadModel.from_causal_lm(policy)
    ppo_cfg = PPOConfig(rollout_batch_size=8, mini_batch_size=4, grad_accum_steps=2, ppo_epochs=1, **cfg)
    return PPOTrainer(
        policy, copy.deepcopy(policy), value, tok, ppo_cfg,
        prompt_sampler=lambda n, rng: [task.prompt_text(d) for d in task.sample_digits(n, rng)],
        reward_fn=task.true_scores,
        ptx_sampler=lambda n, rng: [task.sft_example(rng) for _ in range(n)],
        backend=backend,
    ), task


def _strip(rows):
    return [{k: v for k, v in r.items() if not any(k.startswith(t) for t in TIMING_KEYS)} for r in rows]


def test_reward_loss_on_hand_made_rankings():
    rewards = torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.5, 0.2]])
    loss, accuracy = pairwise_loss(rewards)
    # pairs (0,1), (0,2), (1,2) per prompt, winner first
    diffs = [1.0, 3.0, 2.0, -0.5, -0.2, 0.3]
    want = sum(-math.log(1 / (1 + math.exp(-d))) for d in diffs) / 6
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert accuracy.item() == pytest.approx(4 / 6)


def test_sft_loss_is_response_only_nll():
    tok, policy = _parts()
    trainer = SFTTrainer(policy, tok, SFTConfig(steps=1), verbose=False)
    prompts, responses = ["1 2 3 =", "4 ="], ["2 3 4", "5"]
    got = trainer.loss(prompts, responses)
    # By hand: log_softmax over the full forward, response tokens (+ EOS) only.
    p_ids, p_mask = encode_prompts(tok, prompts)
    r_ids, r_mask = encode_responses(tok, responses, [True, True])
    batch = make_batch(p_ids, p_mask, r_ids, r_mask)
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits.double()
    logp = torch.log_softmax(logits[:, batch.prompt_len - 1 : -1], -1)
    token_logp = logp.gather(-1, r_ids.unsqueeze(-1)).squeeze(-1)
    want = -(token_logp * r_mask).sum() / r_mask.sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


def test_ppo_iterations_on_tiny_model_change_the_policy():
    trainer, _ = _ppo_trainer(ptx_coef=0.1)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    for _ in range(2):
        m = trainer.step()
        for key in ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "entropy",
                    "response_length", "tokens_per_s", "ptx_loss", "timing/rollout_s", "timing/update_s",
                    "memory/update_peak_mb"):
            assert key in m and math.isfinite(m[key]), key
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_eager_backend_gives_the_same_first_iteration():
    metrics = {}
    for backend in ("eager", None):
        trainer, _ = _ppo_trainer(backend=backend, seed=3, entropy_coef=0.01)
        metrics[backend] = _strip([trainer.step()])[0]
    ref, ker = metrics["eager"], metrics[None]
    assert ref.keys() == ker.keys()
    for key in ref:
        assert ker[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key


def test_logits_gradient_in_the_forward_gives_the_same_update():
    """logits_grad_inplace=False (the gradient written during the forward into
    its own buffer) trains exactly like the default in-place backward."""
    params = {}
    for inplace in (True, False):
        trainer, _ = _ppo_trainer(seed=5, entropy_coef=0.01, ptx_coef=0.1, logits_grad_inplace=inplace,
                                  fused_lm_head=False)
        trainer.step()
        params[inplace] = [p.detach().clone() for p in trainer.policy.parameters()]
    for a, b in zip(params[True], params[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fused_lm_head_gives_the_same_iteration():
    """fused_lm_head (log-probs and loss from the hidden state: no (B, T, V)
    logits) gives the logits path's metrics and update, PPO-ptx and entropy
    bonus included."""
    metrics, params = {}, {}
    for fused in (True, False):
        trainer, _ = _ppo_trainer(seed=6, entropy_coef=0.01, ptx_coef=0.1, fused_lm_head=fused)
        calls = []
        import rlhf_kernels.trainer.ppo as ppo_module
        originals = (ppo_module.logprobs_from_hidden, ppo_module.ppo_loss_from_hidden)
        ppo_module.logprobs_from_hidden = lambda *a, **k: calls.append("logp") or originals[0](*a, **k)
        ppo_module.ppo_loss_from_hidden = lambda *a, **k: calls.append("loss") or originals[1](*a, **k)
        try:
            metrics[fused] = _strip([trainer.step()])[0]
        finally:
            ppo_module.logprobs_from_hidden, ppo_module.ppo_loss_from_hidden = originals
        params[fused] = [p.detach().clone() for p in trainer.policy.parameters()]
        # rollout (policy, reference), ptx and the update's loss all through the hidden-state ops
        assert (calls.count("logp") >= 3 and calls.count("loss") >= 1) if fused else not calls
    for key in metrics[False]:
        assert metrics[True][key] == pytest.approx(metrics[False][key], rel=1e-4, abs=1e-5), key
    for a, b in zip(params[True], params[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_padding_free_update_equals_the_padded_one():
    """padding_free: on a rollout whose responses are cut to ragged lengths,
    the update's losses and statistics and the trained weights equal the
    padded update's, with at least 30% of the padded tokens not run."""
    padded, _ = _ppo_trainer(seed=8, entropy_coef=0.01)
    packed, _ = _ppo_trainer(seed=8, entropy_coef=0.01, padding_free=True)
    r = padded.rollout()
    prompt_len, width = r.batch.prompt_len, r.batch.response_mask.shape[1]
    for i in range(r.batch.response_mask.shape[0]):  # one full response in four, the rest 1 to 3 tokens
        cut = width if i % 4 == 0 else 1 + i % 3
        r.batch.response_mask[i, cut:] = 0
        r.batch.attention_mask[i, prompt_len + cut:] = 0
    packed.data_rng.setstate(padded.data_rng.getstate())  # the same mini-batch shuffle
    want, got = padded.update(r), packed.update(r)
    assert got["padding_free/tokens_saved_frac"] >= 0.3, got
    for key in want:
        if not key.startswith(("memory/", "grad_norm")):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3)
    for a, b in zip(packed.policy.parameters(), padded.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_padding_free_refuses_a_model_whose_attention_crosses_sequences(monkeypatch):
    """The first packed step checks the packed forward against the padded one:
    a model that drops position_ids (so its attention spans the packed row)
    stops with the reason."""
    trainer, _ = _ppo_trainer(seed=9, padding_free=True)
    r = trainer.rollout()
    forward = trainer.policy.forward
    monkeypatch.setattr(trainer.policy, "forward", lambda *a, position_ids=None, **k: forward(*a, **k))
    with pytest.raises(ValueError, match="padding_free: .* differs from its padded one"):
        trainer.update(r)


def test_fused_lm_head_falls_back_for_soft_capped_logits(caplog):
    """A head the fused ops do not express (Gemma 2's final-logit soft-capping)
    takes the logits path, with a warning naming the reason."""
    trainer, _ = _ppo_trainer(seed=2)
    trainer.policy.config.final_logit_softcapping = 30.0
    with caplog.at_level("WARNING"):
        head, _ = trainer._head(trainer.policy)
    assert head is None and "final_logit_softcapping" in caplog.text


def test_ptx_term_is_coef_times_mean_nll():
    trainer, task = _ppo_trainer(ptx_coef=0.5)
    trainer.data_rng = random.Random(7)
    got = trainer._ptx_loss()
    rng = random.Random(7)
    examples = [task.sft_example(rng) for _ in range(trainer.config.ptx_batch_size)]
    p_ids, p_mask = encode_prompts(trainer.tokenizer, [p for p, _ in examples])
    r_ids, r_mask = encode_responses(trainer.tokenizer, [r for _, r in examples], [True] * len(examples))
    batch = make_batch(p_ids, p_mask, r_ids, r_mask)
    ids, attn = batch.input_ids, batch.attention_mask
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    logits = trainer.policy(input_ids=ids, attention_mask=attn, position_ids=pos).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = (attn[:, 1:] * attn[:, :-1]).double()
    want = -0.5 * (logp * mask).sum() / mask.sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


def test_prompts_get_one_bos_even_when_the_chat_template_writes_it():
    tok = build_tokenizer()
    assert tok.bos_token_id is not None
    ids, mask = encode_prompts(tok, ["12", tok.bos_token + "12"])
    assert ids[0].tolist() == ids[1].tolist() and (ids == tok.bos_token_id).sum(1).tolist() == [1, 1]


def test_lm_targets_skip_left_padding():
    """Position t predicts token t + 1 when both are real: a left-padded row's
    first real token (<bos>) is not a target predicted from a pad position."""
    ids = torch.tensor([[0, 0, 1, 5, 6], [1, 7, 8, 9, 2]])
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels, mask = lm_targets(ids, attn)
    assert labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [7, 8, 9, 2]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def _with_attention_dropout(*models, p=0.5):
    for model in models:
        for m in model.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = p


def test_rollouts_never_use_dropout():
    """With dropout in the models (attention 0.5), the rollout's old log-probs
    and values are deterministic passes, after an update as before it; so are
    the update's by default (dropout_in_update=False)."""
    trainer, _ = _ppo_trainer(seed=4)
    _with_attention_dropout(trainer.policy, trainer.value_model)
    trainer.step()
    r = trainer.rollout()
    # the same passes again (in the rollout's row chunks): the same numbers
    assert torch.equal(r.old_logp, trainer._in_rows(lambda b: trainer._logprobs(trainer.policy, b), r.batch))
    assert torch.equal(r.old_values, trainer._in_rows(trainer._values, r.batch))
    trainer.update(r)
    assert not trainer.policy.training and not trainer.value_model.training
    trainer.config.dropout_in_update = True
    trainer.update(r)
    assert trainer.policy.training and trainer.value_model.training


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_entropy_bonus_follows_loss_agg_fused_or_not(loss_agg):
    """The unfused path's entropy bonus is aggregated by loss_agg as the fused
    loss's is (it was a token mean whatever loss_agg said): the same policy
    loss and entropy on responses of unequal lengths."""
    trainer, _ = _ppo_trainer(seed=7, entropy_coef=0.5, loss_agg=loss_agg)
    r = trainer.rollout()
    r.batch.response_mask[0, 1:] = 0  # unequal lengths: the aggregation modes differ
    r.batch.response_mask[1, 3:] = 0
    idx = torch.arange(4)
    tokens = float(r.batch.response_mask[idx].sum())
    counts = dict(num_tokens=tokens, num_seqs=4.0, value_tokens=tokens, value_seqs=4.0)
    out = {}
    for fused in (True, False):
        trainer.config.fused_loss = fused
        out[fused] = trainer._micro_step(r, idx, counts, with_ptx=False)
    for key in ("policy_loss", "entropy"):
        assert float(out[False][key]) == pytest.approx(float(out[True][key]), rel=1e-5, abs=1e-7), key


def test_logged_entropy_is_the_same_fused_or_not():
    """The fused loss's entropy is a share of the step's global token count: it
    adds up over micro-batches (it was halved with grad_accum_steps=2)."""
    logged = {}
    for fused in (True, False):
        trainer, _ = _ppo_trainer(seed=6, fused_loss=fused, entropy_coef=0.01)
        logged[fused] = trainer.step()
    for key in ("entropy", "policy_loss", "value_loss", "clipfrac"):
        assert logged[True][key] == pytest.approx(logged[False][key], rel=1e-4, abs=1e-6), key


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "rlhf_kernels.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_checkpoint_on_sigint_and_resume_gives_the_same_metrics(tmp_path):
    cfg = tiny_config(tmp_path / "unused", iterations=6)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    full = _run_cli(["--config", str(cfg_file), "--out", str(tmp_path / "full")])
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out

    proc = _run_cli(["--config", str(cfg_file), "--out", str(tmp_path / "cut")])
    metrics = tmp_path / "cut" / "ppo" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, out  # stopped early, with a checkpoint
    assert (tmp_path / "cut" / "ppo" / "checkpoint.pt").exists()
    resumed = _run_cli(["--config", str(cfg_file), "--out", str(tmp_path / "cut"), "--resume"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out

    def rows(name):
        return _strip([json.loads(l) for l in (tmp_path / name / "ppo" / "metrics.jsonl").read_text().splitlines()])

    a, b = rows("full"), rows("cut")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["iteration"], k)


def test_ddp_two_processes_on_gloo(tmp_path):
    cfg = tiny_config(tmp_path / "ddp", iterations=2)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "rlhf_kernels.cli", "train", "--config", str(cfg_file)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 2
    rows = [json.loads(l) for l in (tmp_path / "ddp" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    # Global statistics: tokens counted over both ranks (16 rollouts each).
    assert all(r["tokens"] >= 2 * 16 for r in rows)
    # The checkpoint holds each rank's random streams (prompts, sampling noise), and they differ.
    ranks = torch.load(tmp_path / "ddp" / "ppo" / "checkpoint.pt", weights_only=False)["trainer"]["rank_rng"]
    assert len(ranks) == 2
    assert ranks[0]["data_rng"] != ranks[1]["data_rng"]
    assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])


def test_train_fsdp_on_two_gloo_ranks_every_stage_data_parallel_and_resumes_on_one(tmp_path):
    """`train --strategy fsdp` under torchrun: SFT, the reward model and PPO
    each FSDP2-sharded over 2 ranks in bf16 mixed precision (each rank its own examples); the PPO
    checkpoint is torch.distributed.checkpoint shards, resumed on 1 rank; the
    SFT and RM checkpoints are gathered full state dicts."""
    cfg = tiny_config(tmp_path / "fsdp", iterations=2)
    cfg.sft.steps, cfg.reward.steps = 6, 4
    cfg.ppo.checkpoint_every = 1
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           "-m", "rlhf_kernels.cli", "train", "--config", str(cfg_file), "--strategy", "fsdp", "--precision", "bf16"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "fsdp"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp" and summary["iterations"] == 2
    assert len((out / "sft" / "metrics.jsonl").read_text().splitlines()) == 6
    tok, policy = _parts()
    policy.load_state_dict(torch.load(out / "sft" / "policy.pt"))  # a full state dict, not shards
    ScalarHeadModel.from_causal_lm(policy).load_state_dict(torch.load(out / "reward" / "model.pt"))
    policy.load_state_dict(torch.load(out / "ppo" / "policy.pt"))
    shards = sorted(p.name for p in (out / "ppo" / "checkpoint").iterdir())
    assert "trainer.pt" in shards and sum(n.endswith(".distcp") for n in shards) == 2
    cfg.ppo.iterations = 3
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    one = _run_cli(["--config", str(cfg_file), "--strategy", "fsdp", "--precision", "bf16", "--resume"])
    log, _ = one.communicate(timeout=600)
    assert one.returncode == 0, log
    assert "resumed from" in log and "at iteration 2 on 1 rank(s)" in log
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]


def _stop_and_reduce_worker(rank, world, port, out):
    import torch.distributed as dist

    from rlhf_kernels.trainer.ppo import _reduce_over_ranks
    from rlhf_kernels.trainer.utils import StopRequested

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stop = StopRequested()
    first = stop.agreed()
    stop.requested = rank == 1  # only rank 1 was signalled
    second = stop.agreed()
    stats = _reduce_over_ranks({"policy_loss": 1.0 + rank, "clipfrac": 0.1 * (rank + 1)}, {"policy_loss"}, world,
                               "cpu")
    torch.save({"first": first, "second": second, "stats": stats}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_stop_flag_and_logged_losses_agree_across_ranks(tmp_path):
    """A signal on one rank stops every rank at the same step (else the others
    block in the next collective); logged loss shares add up over ranks, the
    other statistics average."""
    import torch.multiprocessing as mp

    mp.spawn(_stop_and_reduce_worker, args=(2, 29523, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["first"] is False and got["second"] is True
        assert got["stats"]["policy_loss"] == pytest.approx(3.0)
        assert got["stats"]["clipfrac"] == pytest.approx(0.15)


def test_main_job_improves_true_score_at_reduced_size(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "main"))
    cfg.sft.steps = 200
    cfg.reward.steps = 100
    # 30 iterations: at 20 the gain (+0.05 needed) was +0.085 with the
    # four-GEMM fused loss and +0.046 with the three-GEMM one, whose gradients
    # differ at float rounding (the sampled trajectories then diverge); at 30,
    # +0.063 and +0.104.
    cfg.ppo.iterations = 30
    cfg.ppo.eval_prompts = 128
    summary = pipeline.run(cfg, verbose=False)
    assert summary["ppo_true_score"] > summary["sft_true_score"] + 0.05, summary
    assert 0 <= summary["kl_to_sft"] < 10, summary
    assert (tmp_path / "main" / "ppo" / "curves.png").exists()


def test_bad_configurations_stop_at_start(tmp_path):
    cfg = tiny_config(tmp_path / "bad")
    cfg.model = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="--model"):
        pipeline.run(cfg)
    cfg = tiny_config(tmp_path / "bad")
    cfg.ppo.mini_batch_size = 5
    with pytest.raises(ConfigError, match="multiple of mini_batch_size"):
        pipeline.run(cfg)
    # A tokenizer without a pad token.
    tok, policy = _parts()
    model_dir = tmp_path / "model"
    policy.save_pretrained(model_dir)
    tok.pad_token = None
    tok.save_pretrained(model_dir)
    cfg = tiny_config(tmp_path / "bad")
    cfg.model = str(model_dir)
    with pytest.raises(ValueError, match="no pad token"):
        pipeline.run(cfg)
    cfg = tiny_config(tmp_path / "bad")
    cfg.task.num_digits = 2
    cfg.ppo.eval_prompts = 60  # of 100 prompts: the training stream would never end
    with pytest.raises(ConfigError, match="eval_prompts"):
        pipeline.run(cfg)
    cfg = tiny_config(tmp_path / "bad")
    cfg.ppo.eval_prompts = 0  # crashed after SFT and the reward model
    with pytest.raises(ConfigError, match="ppo.eval_prompts: 0"):
        pipeline.run(cfg)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"ppo": {"itertions": 3}}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(bad_json)


def _group_trainer(algo, seed=8, **cfg):
    torch.manual_seed(seed)
    tok, policy = _parts(seed)
    task = DigitTask()
    ppo_cfg = PPOConfig(algo=algo, group_size=4, rollout_batch_size=8, mini_batch_size=4, grad_accum_steps=2,
                        ppo_epochs=1, **cfg)
    return PPOTrainer(policy, copy.deepcopy(policy), None, tok, ppo_cfg,
                      prompt_sampler=lambda n, rng: [task.prompt_text(d) for d in task.sample_digits(n, rng)],
                      reward_fn=task.true_scores), task


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_grpo_and_rloo_sample_groups_and_use_outcome_advantages(algo):
    """GRPO / RLOO: group_size samples of each prompt (consecutive), one
    advantage per response from its group (GRPO: normalised scores; RLOO:
    leave-one-out baseline of the KL-penalised score) on all its tokens, no
    critic; an iteration trains the policy."""
    from rlhf_kernels import group_advantages

    trainer, _ = _group_trainer(algo)
    assert trainer.value_model is None and trainer.value_opt is None
    r = trainer.rollout()
    assert all(len(set(r.prompts[i : i + 4])) == 1 for i in range(0, 8, 4))
    mask = r.batch.response_mask
    seq_kl = ((r.old_logp - r.ref_logp) * mask).sum(1)
    outcome = r.scores if algo == "grpo" else r.scores - float(trainer.config.init_kl_coef) * seq_kl
    want = group_advantages(outcome, 4, mode=algo).unsqueeze(1) * mask
    torch.testing.assert_close(r.advantages, want)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    stats = trainer.update(r)
    assert "value_loss" not in stats and math.isfinite(stats["policy_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


@pytest.mark.parametrize("algo, estimator", [("grpo", "dr_grpo"), ("grpo", "opo"), ("grpo", "grpo_passk"),
                                             ("rloo", "passk"), ("grpo", "rloo")])
def test_adv_estimator_picks_the_group_mode_and_is_recorded(algo, estimator):
    """PPOConfig.adv_estimator: the group_advantages mode of the outcome
    advantages (opo with the response lengths), the algo's KL placement
    kept (rloo: in the score); step() records it and the loss type."""
    from rlhf_kernels import group_advantages

    trainer, _ = _group_trainer(algo, adv_estimator=estimator)
    r = trainer.rollout()
    mask = r.batch.response_mask
    seq_kl = ((r.old_logp - r.ref_logp) * mask).sum(1)
    outcome = r.scores if algo == "grpo" else r.scores - float(trainer.config.init_kl_coef) * seq_kl
    lengths = mask.sum(1).to(outcome.dtype) if estimator == "opo" else None
    want = group_advantages(outcome, 4, mode=estimator, lengths=lengths).unsqueeze(1) * mask
    torch.testing.assert_close(r.advantages, want)
    if estimator == "opo":  # the lengths matter on this rollout
        assert not torch.allclose(want, group_advantages(outcome, 4, mode="grpo").unsqueeze(1) * mask)
    record = trainer.step()
    assert record["adv_estimator"] == estimator and record["loss_type"] == "clip"


def test_adv_estimator_config_errors():
    tok, policy = _parts(0)
    for cfg, match in ((dict(algo="ppo", adv_estimator="grpo"), "ppo.adv_estimator"),
                       (dict(algo="grpo", adv_estimator="gae"), "ppo.adv_estimator"),
                       (dict(algo="grpo", adv_estimator="remax"), "ppo.adv_estimator")):
        with pytest.raises(ConfigError, match=match):
            PPOTrainer(policy, copy.deepcopy(policy), None, tok, PPOConfig(rollout_batch_size=8, mini_batch_size=4,
                                                                            **cfg),
                       prompt_sampler=lambda n, rng: [], reward_fn=lambda *a: None)


def test_grpo_kl_term_is_the_same_fused_or_not():
    """GRPO's k3 KL term of the loss: the fused loss (from the hidden state)
    and the unfused one (log-probs, ppo_policy_loss, kl_penalty) agree."""
    out = {}
    for fused in (True, False):
        trainer, _ = _group_trainer("grpo", seed=9, fused_loss=fused, init_kl_coef=0.5, target_kl=None)
        r = trainer.rollout()
        r.ref_logp = r.ref_logp - 0.3 * torch.rand_like(r.ref_logp)  # a reference that differs
        idx = torch.arange(4)
        tokens = float(r.batch.response_mask[idx].sum())
        counts = dict(num_tokens=tokens, num_seqs=4.0, value_tokens=tokens, value_seqs=4.0)
        out[fused] = trainer._micro_step(r, idx, counts, with_ptx=False)
    for key in ("policy_loss", "kl_loss"):
        assert float(out[False][key]) == pytest.approx(float(out[True][key]), rel=1e-5, abs=1e-7), key
    assert float(out[True]["kl_loss"]) > 0.01


def test_group_algorithms_refuse_a_critic_and_bad_group_sizes():
    tok, policy = _parts(0)
    value = ScalarHeadModel.from_causal_lm(policy)
    with pytest.raises(ValueError, match="value_model: algo 'grpo' takes none"):
        PPOTrainer(policy, copy.deepcopy(policy), value, tok, PPOConfig(algo="grpo", rollout_batch_size=8,
                                                                         mini_batch_size=4),
                   prompt_sampler=lambda n, rng: [], reward_fn=lambda *a: None)
    with pytest.raises(ConfigError, match="ppo.group_size: 3"):
        PPOTrainer(policy, copy.deepcopy(policy), None, tok, PPOConfig(algo="rloo", group_size=3,
                                                                        rollout_batch_size=8, mini_batch_size=4),
                   prompt_sampler=lambda n, rng: [], reward_fn=lambda *a: None)


# --- rollout correction (the sampler's log-probs against the trainer's) ------------------------


def test_sampler_logprobs_from_generate_match_the_trainers():
    """The sampler's log-probs (generate's processed scores, at T != 1) equal
    the trainer's recompute of the same tokens to float32 rounding, and the
    mismatch statistics of every iteration say so."""

    trainer, _ = _ppo_trainer(seed=11, temperature=0.7, rollout_correction=RolloutCorrectionConfig(measure=True))
    r = trainer.rollout()
    mask = r.batch.response_mask.bool()
    assert mask.any()
    torch.testing.assert_close(r.sampler_logp[mask], r.old_logp[mask], atol=1e-4, rtol=1e-4)
    assert (r.sampler_logp[~mask] == 0).all()
    assert r.is_weights is None and r.loss_mask is None  # measured only
    assert 0 <= r.stats["mismatch/abs_diff_max"] < 1e-4
    row = _strip([trainer.step()])[0]
    for key in ("mismatch/k1", "mismatch/k3", "mismatch/abs_diff_mean", "mismatch/abs_diff_max",
                "correction/weight_mean", "correction/rejected_token_frac", "correction/rejected_seq_frac"):
        assert key in row and math.isfinite(row[key]), key


@pytest.mark.parametrize("sampler", [dict(top_p=0.9), dict(top_k=20, top_p=0.8, min_p=0.05)], ids=str)
def test_truncated_sampling_logprobs_match_the_samplers(sampler):
    """With top-k / top-p / min-p rollouts (HF generate), the trainer's old
    and reference log-probs are those of the sampled (renormalised, kept)
    distribution: the sampler's own processed log-probs to float32 rounding,
    where the untruncated ones sit about -log P(kept) below; the update's
    loss runs on the same truncation."""

    trainer, _ = _ppo_trainer(seed=13, temperature=0.7, rollout_correction=RolloutCorrectionConfig(measure=True),
                              **sampler)
    assert trainer._head(trainer.policy) == (None, False)  # the kept set needs whole rows: the logits path
    r = trainer.rollout()
    mask = r.batch.response_mask.bool()
    assert mask.any()
    torch.testing.assert_close(r.sampler_logp[mask], r.old_logp[mask], atol=1e-4, rtol=1e-4)
    assert 0 <= r.stats["mismatch/abs_diff_max"] < 1e-4
    batch = r.batch
    with torch.no_grad():
        logits = response_logits(trainer.policy, batch.input_ids, batch.attention_mask, batch.prompt_len)
        full = rlhf_kernels.logprobs_from_logits(logits, batch.response_labels, temperature=0.7)
        kept = rlhf_kernels.logprobs_from_logits(logits, batch.response_labels, temperature=0.7, **sampler)
        with trainer._frozen("ref") as ref_model:
            ref = rlhf_kernels.logprobs_from_logits(
                response_logits(ref_model, batch.input_ids, batch.attention_mask, batch.prompt_len),
                batch.response_labels, temperature=0.7, **sampler)
    torch.testing.assert_close(kept[mask], r.old_logp[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref[mask], r.ref_logp[mask], atol=1e-5, rtol=1e-5)
    gap = (kept - full)[mask]
    assert (gap >= -1e-6).all() and gap.mean() > 0.01  # log 1 / P(kept) >= 0, and not negligible here
    row = trainer.step()
    assert math.isfinite(row["policy_loss"]) and row["mismatch/abs_diff_max"] < 1e-4


def test_truncation_config_errors():
    with pytest.raises(ConfigError, match="ppo.top_p must be in"):
        _ppo_trainer(top_p=0.0)
    with pytest.raises(ConfigError, match="ppo.padding_free: not with top_k"):
        _ppo_trainer(top_k=5, padding_free=True)


def test_rollout_correction_weights_and_rejection_reach_the_policy_loss(monkeypatch):
    """A sampler that disagrees with the policy: the importance weights
    (rollout_is) become the policy loss's token_weights and the rejected
    tokens (rollout_rs) leave its mask and its token count, as
    rollout_correction computes them from the two log-probs."""

    rc = RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold=1.5, rollout_rs="token_k2",
                                 rollout_rs_threshold=0.02)
    trainer, _ = _ppo_trainer(seed=12, rollout_correction=rc)
    generate = trainer.generate
    gen = torch.Generator().manual_seed(0)

    def noisy(prompts, **kw):  # the sampler's log-probs 0.2 off the policy's
        out = generate(prompts, **kw)
        if not kw.get("sampler_logp"):
            return out
        noise = 0.2 * torch.randn(out[3].shape, generator=gen)
        return (*out[:3], out[3] + noise * out[0].response_mask)

    monkeypatch.setattr(trainer, "generate", noisy)
    r = trainer.rollout()
    mask = r.batch.response_mask.bool()
    want = rlhf_kernels.rollout_correction(r.old_logp, r.sampler_logp, mask, mode="truncate", upper=1.5,
                                           rejection={"token_k2": 0.02})
    torch.testing.assert_close(r.is_weights, want.weights)
    assert torch.equal(r.loss_mask.bool(), want.mask)
    assert 0 < r.stats["correction/rejected_token_frac"] < 1
    assert r.stats["mismatch/abs_diff_mean"] > 0.05
    # The policy loss of a micro-batch: ppo_loss_from_hidden with those weights and that mask.
    idx = torch.arange(4)
    counts = dict(num_tokens=float(r.loss_mask[idx].sum()), num_seqs=float((r.loss_mask[idx].sum(1) > 0).sum()),
                  value_tokens=float(r.batch.response_mask[idx].sum()), value_seqs=4.0)
    got = trainer._micro_step(r, idx, counts, with_ptx=False)
    trainer.config.fused_loss = False
    batch = r.batch.select(idx)
    with torch.no_grad():
        logp = trainer._token_logprobs(trainer.policy, batch.input_ids, batch.attention_mask, batch.prompt_len,
                                       batch.response_labels, temperature=trainer.config.temperature)
    loss, _ = rlhf_kernels.ppo_policy_loss(logp, r.old_logp[idx], r.advantages[idx], r.loss_mask[idx],
                                           token_weights=r.is_weights[idx], num_tokens=counts["num_tokens"])
    assert float(got["policy_loss"]) == pytest.approx(float(loss), rel=1e-4, abs=1e-6)
    trainer.update(r)  # the update runs on the corrected batch


def test_bypass_mode_uses_the_samplers_logprobs_as_old():

    trainer, _ = _ppo_trainer(seed=13, rollout_correction=RolloutCorrectionConfig(bypass_mode=True))
    calls = []
    logprobs = trainer._logprobs
    trainer._logprobs = lambda model, b: calls.append(model) or logprobs(model, b)
    r = trainer.rollout()
    assert r.old_logp is r.sampler_logp
    assert calls and all(m is not trainer.policy for m in calls)  # the reference's passes only
    assert r.stats["mismatch/abs_diff_max"] == 0


def test_rollout_correction_config_errors_name_the_field():
    from rlhf_kernels.trainer.config import ConfigError, RolloutCorrectionConfig, validate_ppo

    for rc, match in ((RolloutCorrectionConfig(rollout_is="tok"), "rollout_correction.rollout_is"),
                      (RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold="a_b"),
                       "rollout_correction.rollout_is_threshold"),
                      (RolloutCorrectionConfig(rollout_rs="token_k2"), "rollout_correction.rollout_rs_threshold"),
                      (RolloutCorrectionConfig(rollout_rs="seq_max_k1", rollout_rs_threshold=2.0),
                       "unknown option 'seq_max_k1'"),
                      (RolloutCorrectionConfig(rollout_rs="token_k3", rollout_rs_threshold="0.1_0.2"),
                       "takes one upper bound")):
        with pytest.raises(ConfigError, match=match):
            validate_ppo(PPOConfig(rollout_correction=rc))


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "gpg", "dppo_tv", "dppo_kl", "dapo", "dr_grpo", "gmpo",
                                       "kl_cov", "luspo", "vespo", "dro"])
def test_loss_types_are_the_same_fused_or_not(loss_type):
    """PPOConfig.loss_type reaches the policy loss on the fused path (from the
    hidden state) and the unfused one (log-probs, then ppo_loss_from_logprobs):
    the same loss; TRL's names bring their aggregation."""
    from rlhf_kernels.trainer.config import objective

    out = {}
    for fused in (True, False):
        # dppo's thresholds are on probabilities (the tiny model's are small)
        thresholds = dict(clip_low=0.002, clip_high=0.002) if loss_type.startswith("dppo") else {}
        if loss_type == "dro":
            thresholds = dict(dro_beta=0.3)
        trainer, _ = _group_trainer("grpo", seed=9, fused_loss=fused, loss_type=loss_type, init_kl_coef=0.1,
                                    target_kl=None, **thresholds)
        r = trainer.rollout()
        r.old_logp = r.old_logp + 0.3 * torch.randn_like(r.old_logp)  # ratios away from 1
        idx = torch.arange(4)
        tokens = float(r.batch.response_mask[idx].sum())
        counts = dict(num_tokens=tokens, num_seqs=4.0, value_tokens=tokens, value_seqs=4.0)
        out[fused] = trainer._micro_step(r, idx, counts, with_ptx=False)
        assert objective(trainer.config) == {
            "dapo": ("clip", "token-mean"), "dr_grpo": ("clip", "seq-mean-token-sum-norm"),
            "sapo": ("sapo", "seq-mean-token-mean"),
            "gmpo": ("geo_mean", "seq-mean-token-mean"),
            "luspo": ("luspo", "seq-mean-token-sum")}.get(loss_type, (loss_type, "token-mean"))
    for key in ("policy_loss", "clipfrac", "clipfrac_lower"):
        assert float(out[False][key]) == pytest.approx(float(out[True][key]), rel=1e-5, abs=1e-7), key
    if loss_type in ("cispo", "dppo_tv", "dppo_kl", "gmpo"):  # its selection happens on this data
        assert 0 < float(out[True]["clipfrac"]) < 1


def test_loss_type_config_errors():
    tok, policy = _parts(0)
    for cfg, match in ((dict(loss_type="vanilla"), "ppo.loss_type"), (dict(loss_type="sapo", dual_clip=3.0),
                                                                      "ppo.dual_clip"),
                       (dict(loss_type="sapo", tau_neg=0.0), "tau_pos and tau_neg"),
                       (dict(loss_type="vespo", vespo_params=(1.0, 2.0)), "vespo_params"),
                       (dict(loss_type="dro"), "ppo.dro_beta"), (dict(loss_type="dro", dro_beta=-1.0), "ppo.dro_beta"),
                       (dict(loss_type="dro", dro_beta=0.1,
                             rollout_correction=RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold=2.0)),
                        "rollout_is")):
        with pytest.raises(ConfigError, match=match):
            PPOTrainer(policy, copy.deepcopy(policy), None, tok, PPOConfig(algo="grpo", rollout_batch_size=8,
                                                                            mini_batch_size=4, **cfg),
                       prompt_sampler=lambda n, rng: [], reward_fn=lambda *a: None)


@pytest.fixture(scope="module")
def sft_policy():
    """The tiny policy after 200 SFT steps on the embedded task (the main job's
    first stage at reduced size), and its tokenizer."""
    tok, policy = _parts(0)
    sft = SFTTrainer(policy, tok, SFTConfig(steps=200, batch_size=32), verbose=False)
    sft.train(DigitTask().sft_example)
    return tok, sft.model


@pytest.mark.parametrize("loss_type", ["clip", "cispo", "sapo", "gpg", "dppo_tv", "dppo_kl", "gmpo", "luspo", "vespo"])
def test_grpo_with_each_loss_type_improves_the_true_score(sft_policy, loss_type):
    """GRPO on the task's true score from the SFT policy, 15 iterations of 32
    responses: the held-out true score rises by > 0.05 with each objective
    (+0.095 for each on this seed; 0.716 before)."""
    tok, base = sft_policy
    torch.manual_seed(1)
    policy = copy.deepcopy(base)
    before, after, _ = _grpo_on_task(policy, copy.deepcopy(policy), tok, loss_type=loss_type, iterations=15)
    assert after > before + 0.05, (before, after)


def _grpo_on_task(policy, ref_policy, tok, **cfg) -> tuple[float, float, PPOTrainer]:
    """GRPO on the embedded task's true score (groups of 4, 32 responses per
    iteration): the held-out true score before and after, and the trainer."""
    task = DigitTask()
    cfg = PPOConfig(algo="grpo", group_size=4, rollout_batch_size=32, mini_batch_size=16, grad_accum_steps=1,
                    ppo_epochs=1, **cfg)
    trainer = PPOTrainer(policy, ref_policy, None, tok, cfg,
                         prompt_sampler=lambda n, rng: [task.prompt_text(d) for d in task.sample_digits(n, rng)],
                         reward_fn=task.true_scores)
    prompts = [task.prompt_text(d) for d in task.sample_digits(128, random.Random(0))]
    before = trainer.evaluate(prompts, task.true_scores)["true_score"]
    for _ in range(cfg.iterations):
        trainer.update(trainer.rollout())
    return before, trainer.evaluate(prompts, task.true_scores)["true_score"], trainer


def test_grpo_with_lora_adapters_improves_the_true_score(sft_policy):
    """GRPO with LoRA adapters (r 16) on the SFT policy, its reference the SFT
    policy itself (the adapters off), 20 iterations of 32 responses: the
    held-out true score rises by > 0.05, as with the full weights above
    (0.716 -> 0.803 on this seed, 0.796 on another)."""
    pytest.importorskip("peft")
    from rlhf_kernels.trainer.models import with_lora

    tok, base = sft_policy
    torch.manual_seed(1)
    policy = with_lora(copy.deepcopy(base), 16, 32, 0.0, "all-linear")
    before, after, trainer = _grpo_on_task(policy, None, tok, iterations=20, lora_r=16,
                                           policy_optim=OptimConfig(lr=3e-3, schedule="constant"))
    assert after > before + 0.05, (before, after)
    assert all("lora_" in n for n, p in trainer.policy.named_parameters() if p.requires_grad)


def test_make_optimizer_takes_fused_adamw_where_it_applies():
    """Plain float parameters: torch's fused AdamW, its steps equal to the
    default AdamW's (lr, weight decay, the schedule's factor applied); a
    parameter of a tensor subclass (as FSDP's DTensor): torch's default."""
    from rlhf_kernels.trainer.config import OptimConfig
    from rlhf_kernels.trainer.utils import make_optimizer

    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2, schedule="linear")
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    fused = [torch.nn.Parameter(t.clone()) for t in start]
    plain = [torch.nn.Parameter(t.clone()) for t in start]
    opt, sched = make_optimizer(fused, cfg, total_steps=6)
    assert opt.param_groups[0]["fused"] is True
    ref = torch.optim.AdamW(plain, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, sched.lr_lambdas[0])
    for _ in range(4):
        grads = [torch.randn_like(t) for t in start]
        for params, o, s in ((fused, opt, sched), (plain, ref, ref_sched)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()
            s.step()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(fused[0], start[0])

    class Sharded(torch.nn.Parameter):
        pass

    opt, _ = make_optimizer([Sharded(torch.randn(3))], cfg, total_steps=6)
    assert opt.param_groups[0]["fused"] is None


def _grpo_trainer(seed=7, **cfg):
    torch.manual_seed(seed)
    tok, policy = _parts(seed)
    task = DigitTask()
    settings = dict(algo="grpo", group_size=4, rollout_batch_size=8, mini_batch_size=8, grad_accum_steps=1,
                    ppo_epochs=1, target_kl=None, init_kl_coef=0.05, entropy_coef=0.01)
    settings.update(cfg)
    return PPOTrainer(policy, copy.deepcopy(policy), None, tok, PPOConfig(**settings),
                      prompt_sampler=lambda n, rng: [task.prompt_text(d) for d in task.sample_digits(n, rng)],
                      reward_fn=task.true_scores)


@pytest.mark.parametrize("grad_accum_steps, padding_free", [(1, False), (2, False), (2, True)])
def test_grpo_old_logprobs_from_the_update_give_the_same_iterations(grad_accum_steps, padding_free):
    """GRPO with one optimiser step per rollout: the update's own log-probs,
    detached, stand for the old ones (no recompute forward in the rollout,
    counted; the fused loss on the head with old_logp=None, counted) and the
    iterations equal those with the recompute: every metric (the KL and the
    sampler-mismatch statistics now from the update, its micro-batches'
    log-probs gathered, packed or not) and the parameters."""
    import rlhf_kernels.trainer.ppo as ppo_module

    metrics, params = {}, {}
    for reuse in (True, False):
        trainer = _grpo_trainer(old_logp_from_update=reuse, grad_accum_steps=grad_accum_steps,
                                padding_free=padding_free, rollout_correction=RolloutCorrectionConfig(measure=True))
        assert trainer.old_logp_from_update() is reuse
        rows = []
        for _ in range(2):
            passes = []
            real = ppo_module.PPOTrainer._logprobs
            ppo_module.PPOTrainer._logprobs = lambda self, model, b: passes.append(model) or real(self, model, b)
            try:
                r = trainer.rollout()
            finally:
                ppo_module.PPOTrainer._logprobs = real
            assert (r.old_logp is None) is reuse
            # the reference's pass (in micro-batch chunks); and the policy's recompute
            policy_passes = sum(model is trainer.policy for model in passes)
            assert len(passes) - policy_passes == grad_accum_steps
            assert policy_passes == (0 if reuse else grad_accum_steps)
            assert "kl" in r.stats
            olds = []
            real_loss = ppo_module.ppo_loss_from_hidden
            ppo_module.ppo_loss_from_hidden = lambda *a, **k: olds.append(a[3]) or real_loss(*a, **k)
            try:
                update = trainer.update(r)
            finally:
                ppo_module.ppo_loss_from_hidden = real_loss
            assert len(olds) == grad_accum_steps and all((old is None) is reuse for old in olds)
            rows.append({**{k: float(v) for k, v in r.stats.items()}, **update})
        metrics[reuse], params[reuse] = rows, [p.detach().clone() for p in trainer.policy.parameters()]
    for got, want in zip(metrics[True], metrics[False]):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert metrics[True][1]["kl"] != 0.0 and "mismatch/abs_diff_max" in metrics[True][1]
    for a, b in zip(params[True], params[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cfg", [dict(ppo_epochs=2), dict(mini_batch_size=4), dict(target_kl=1.0), dict(dropout_in_update=True), dict(algo="rloo"),
                                 dict(old_logp_from_update=False),
                                 dict(rollout_correction=RolloutCorrectionConfig(rollout_is="token")),
                                 dict(rollout_correction=RolloutCorrectionConfig(rollout_rs="token_k1",
                                                                                 rollout_rs_threshold=2.0))])
def test_grpo_old_logprobs_are_recomputed_where_the_update_would_differ(cfg):
    """More than one optimiser step per rollout, an adaptive KL coefficient
    (set from the rollout's KL before the update), dropout in the update,
    RLOO (the KL in the rewards), importance weights or a rejection
    mask (the loss's inputs, from the old log-probs) or the option off: the
    recompute."""
    trainer = _grpo_trainer(**cfg)
    assert trainer.old_logp_from_update() is False
    assert trainer.rollout().old_logp is not None
