"""PPO training of language models on Hugging Face transformers, with the
rlhf_kernels ops in place of eager tensor operations: SFT -> reward model ->
PPO with a per-token KL penalty and the pretraining mix (InstructGPT)."""
