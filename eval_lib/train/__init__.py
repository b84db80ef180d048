"""The RFS-style training of a genotype on the base classes, and its few-shot test.

Modules:
    train_config     TrainConfig (the training's and the test's flags)
    after_search     the --aug_* flags: TrainConfig's flags as the commands that train a genotype take them
    network          from a config to the network: architecture, default run folder, size
    epoch            optimiser, learning-rate schedule, one epoch of training
    device_batches   --gpu_augment: training batches made and augmented on the device
    metrics          metrics.jsonl, the per-epoch record (its one owner)
    checkpoints      the self-describing checkpoint.pt, safe reading, the training run folder
    tensorboard_log  the training's optional TensorBoard scalars
    evaluation       episode sets, the few-shot test of a network, results table, --eval_only
    training_plot    training.png
    training_run     TrainingRun: resume, epochs, checkpoints, results (train_and_evaluate)
"""
