"""Evaluation of a searched architecture: RFS-style training on the base classes, few-shot testing.

Modules: config (TrainConfig, presets), models (AugmentCNN), trainer (network, optimiser, one epoch),
checkpoints, train (a training run), evaluation (few-shot test, --eval_only), fewshot (classifiers),
complexity (params, MACs), cli (the command line of eval_searched_arch.py).
"""
