"""Contrastive fine-tuning, and the synthetic shapes the bundled model is trained on."""
