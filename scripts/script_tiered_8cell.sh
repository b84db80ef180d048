#!/usr/bin/env bash
# The paper's tieredImageNet 8-cell MetaNTK-NAS run (docs/method.md §5): the original repository's argument list
# for prune_launch.py, unchanged; arguments given to this script are appended (and win), e.g.
#   METANTKNAS_TIERED_DATA=/data/tieredImageNet bash scripts/script_tiered_8cell.sh --device cpu
# The data folder is --data_path DIR or $METANTKNAS_TIERED_DATA. Runs from any directory.
set -euo pipefail
source "$(dirname "$0")/python_env.sh"  # cd to the repository root; $PY

args=(
    --gpu 0
    # search space
    --space darts_fewshot
    --max_nodes 3
    # data: 3 tasks per meta-batch
    --dataset MetaTieredImageNet
    --dartsbs 3
    # -1: a drawn seed (it names the run folder)
    --seed -1
    # MetaNTK and linear regions, not the regions alone
    --only_lrs false
    --ntk_type MetaNTK_anl
    --algorithm ANIL
    --inner_lr_time 1000
    --reg_coef 1e-3
    # the searched and trained network: 48 channels, 8 cells; then the paper's training
    --ntk_channels 48
    --ntk_layers 8
    --train_after_search true
)

exec "$PY" prune_launch.py "${args[@]}" "$@"
