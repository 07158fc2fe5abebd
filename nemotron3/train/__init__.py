"""Training: tokenizer, data, the one training loop (pretraining now, SFT later), checkpoints, evaluation."""
