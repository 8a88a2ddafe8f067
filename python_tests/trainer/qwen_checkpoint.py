"""A checkpoint as users bring one, built offline for the trainer tests:
Qwen2 architecture, 151936-row vocabulary, bf16, pad == eos, a byte-level BPE
tokenizer trained with ``tokenizers``, a ChatML chat template, an instruct
generation config (sampling with repetition_penalty, min_new_tokens, top-k /
top-p, two EOS ids); and an HF sequence-classification reward model; each
saved with ``save_pretrained`` (and loaded back with ``Auto*`` by the tests)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 151936  # Qwen2's embedding rows (the tokenizer has fewer, as Qwen's)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "count to five: one two three four five",
    "write a short poem about the sea and the sky",
    "digits 0 1 2 3 4 5 6 7 8 9 and words",
    "a reward model scores the response of a policy",
] * 20


def build_tokenizer(path: Path):
    """A byte-level BPE tokenizer trained here; pad == eos == <|endoftext|>
    (Qwen base), <|im_start|> / <|im_end|> specials and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_checkpoints(root: Path, hidden_size: int = 32) -> dict[str, Path]:
    """policy/ (Qwen2ForCausalLM, bf16, instruct generation config: sampling
    with repetition_penalty, top-k / top-p, two EOS ids) and rm/
    (Qwen2ForSequenceClassification, one label, bf16), each with the tokenizer.
    Two attention heads: head_dim = hidden_size / 2 (vLLM's CPU attention needs
    64 or another of its sizes: hidden_size=128)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    tok = build_tokenizer(root / "tokenizer")
    eos, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    shape = dict(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
                 pad_token_id=eos, bos_token_id=None, eos_token_id=eos, torch_dtype="bfloat16")
    config = Qwen2Config(**shape)
    paths = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policy = Qwen2ForCausalLM(config).to(torch.bfloat16)
        policy.generation_config = GenerationConfig(
            do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1, min_new_tokens=2,
            eos_token_id=[im_end, eos], pad_token_id=eos, bos_token_id=None,
        )
        rm = Qwen2ForSequenceClassification(Qwen2Config(**shape, num_labels=1)).to(torch.bfloat16)
    for name, model in (("policy", policy), ("rm", rm)):
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths
