"""Evaluation of searched architectures, on top of `search_lib`: RFS-style training on the base classes, the
few-shot test, the proxy study, and the command lines that compose a search with its training.

Sub-packages, lowest first (each imports only its own, the ones above it here and `search_lib`):

    rfs_models  the trained network (AugmentCNN) and its size
    fewshot     the few-shot test: settings, episodes in batches, classifiers, the network as the test runs it
    train       the training: its config, epochs, checkpoints, metrics, the training run and its picture, the
                --aug_* hand-off of a genotype to a training
    study       the proxy study: proxies, zero-cost proxies, statistics, picture, the study run
    commands    the command lines (eval_searched_arch.py, prune_metantknas.py, prune_launch.py, the study, the
                pictures), the original code's flags, the paper's presets, the sweep

``python -m eval_lib.proxy_study`` and ``python -m eval_lib.report`` are kept at this level (they forward to
`eval_lib.commands.study_command` and `eval_lib.commands.draw_pictures`).
"""

# before anything below imports torch: OpenMP reads how long its threads spin when it loads
from search_lib.core.openmp_env import bound_spinning as _bound_spinning  # noqa: E402

_bound_spinning()
