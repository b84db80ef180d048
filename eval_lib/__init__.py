"""Evaluation of searched architectures, on top of `search_lib`: RFS-style training on the base classes,
the few-shot test, the proxy study, and the command lines that compose a search with its training.

Modules:
    config          TrainConfig (the training's and the test's flags) and the paper's training presets
    models          AugmentCNN, the evaluation network
    network         from a config to the network: architecture, default run folder, size (complexity)
    complexity      parameters, MACs (ptflops) and Conv/Linear MACs (as TE-NAS counts them)
    epoch           optimiser, learning-rate schedule, one epoch of training
    device_batches  --gpu_augment: training batches made and augmented on the device
    metrics         metrics.jsonl, the per-epoch record (its one owner)
    checkpoints     the self-describing checkpoint.pt, safe reading, the training run folder
    train           TrainingRun: resume, epochs, checkpoints, results (train_and_evaluate)
    evaluation      episode sets, the few-shot test of a network, results table, --eval_only
    fewshot         FewShotSettings and meta_test: features once per query image, episodes in batches, 95%
                    intervals
    classifiers     LR / SVM / NN / Cosine / Proto: scikit-learn reference and batched torch versions
    inference       the network as the few-shot test runs it (torch.fx rewrites)
    tensorboard_log the training's optional TensorBoard scalars
    report          training.png; python -m eval_lib.report draws any run folder's pictures
    cli             the command line of eval_searched_arch.py
    aug_flags       the --aug_* flags (the training after a search or in a proxy study)
    search_cli      the command line of prune_metantknas.py (the search, then --train_after_search)
    launch          the command line of prune_launch.py (the paper's presets)
    proxies         the proxies of the proxy study; ZERO_COST_PROXIES, the registry of zero-cost proxies
    zc_gradients    zero-cost proxies from gradients: grad_norm, snip, grasp, fisher, jacob_cov, synflow, zico
    zc_activations  zero-cost proxies from activations: naswot, swap, meco
    study_config    StudyConfig and the studied architectures
    study_stats     rank and partial rank correlations, bootstrap intervals, combined rankings, the table
    study_plot      study.png
    proxy_study     python -m eval_lib.proxy_study
"""
