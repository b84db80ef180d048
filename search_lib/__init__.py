"""Training-free architecture search for few-shot learning (MetaNTK-NAS): the base package.

Everything the search needs lives here; `eval_lib` (training, few-shot test, proxy study, the command lines)
builds on it. Sub-packages, lowest first (each imports only its own and the ones above it in this list;
tests/test_layout.py keeps it so; the map is docs/layout.md, the method docs/method.md):

    core     what every part uses: typed errors, device / seeds / atomic writes, command-line plumbing, threads,
             memory, torchrun, run folders and their locks, the figure helpers
    data     few-shot data: names, file formats, transforms, episodes, search samplers, synthetic data
    models   the search space: operations, cell topology, genotypes, the supernet
    search   the search: kernels, linear regions, ranking, scoring, pruning, its config, its run folder and picture

Two modules stay at this level only to keep documented commands working: ``python -m search_lib.sweep`` and
``python -m search_lib.synthetic`` forward to `eval_lib.commands.sweep` and `search_lib.data.synthetic`.
"""

# before anything below imports torch: OpenMP reads how long its threads spin when it loads
from search_lib.core.openmp_env import bound_spinning as _bound_spinning  # noqa: E402

_bound_spinning()
