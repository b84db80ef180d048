#!/usr/bin/env bash
# Several runs on one machine (docs/batch_runs.md, "Several runs on one box"): one GPU per job, finished runs skipped,
# one log per job, a summary table; exit 1 if any job failed. Every flag goes to eval_lib.commands.sweep, e.g.
#   bash scripts/sweep.sh --presets all --seeds 0,1,2                      # data from $METANTKNAS_*_DATA
#   bash scripts/sweep.sh --jobs_file scripts/sweep_jobs.example --gpus none --jobs 2
set -euo pipefail
source "$(dirname "$0")/python_env.sh"  # cd to the repository root; $PY
exec "$PY" -m eval_lib.commands.sweep "$@"
