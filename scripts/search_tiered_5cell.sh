#!/usr/bin/env bash
# The paper's tieredImageNet 5-cell MetaNTK-NAS search (docs/method.md §5).
# Data folder: --data_path DIR, or $METANTKNAS_TIERED_DATA. Extra flags pass through, e.g.
#   bash scripts/search_tiered_5cell.sh --device cuda --rand_seed 0 --train_after_search
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec "$PY" prune_launch.py --dataset tiered --cells 5 "$@"
