"""The few-shot test of a trained network.

Modules:
    meta_test    FewShotSettings and meta_test: features once per query image, episodes in batches, 95% intervals
    classifiers  LR / SVM / NN / Cosine / Proto: scikit-learn reference and batched torch versions
    inference    the network as the few-shot test runs it (torch.fx rewrites)
"""
