"""Evaluation of searched architectures: the evaluation network, RFS-style training, few-shot testing."""
