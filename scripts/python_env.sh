# Sourced by the scripts of this folder: the repository root becomes the working folder (so the scripts run from
# any directory) and $PY the interpreter: $PYTHON if set, else the repository's .venv, else python3.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
