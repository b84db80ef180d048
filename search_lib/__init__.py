"""Training-free architecture search for few-shot learning (MetaNTK-NAS); the method is docs/method.md.

Modules:
    errors          typed user-facing errors, their exit codes, one-line messages
    cli             command-line plumbing; flags generated from config dataclasses
    utils           device selection, seeding, atomic writes
    threads         thread counts: the user's, the affinity's, and ThreadTuner (chosen by timing)
    memory          --memory_budget, peak memory of a stretch of work, the measured pass size
    run_dir         the one owner of a run folder (search and training alike), its lock
    ops             operation registry of the search spaces
    space           a search space resolved once (ops, edges, edge groups)
    genotypes       genotype value type, parsing, presets, derivation from alphas, the genotype.json record
    supernet        the DARTS-style cell supernet (search network) and its thin variant
    data            few-shot data: names, RFS mini/tieredImageNet and digits loaders, transforms, episodes
    synthetic       writer of synthetic data in the RFS file formats
    kernels         empirical NTK, analytical MetaNTK, condition numbers
    linear_regions  TE-NAS linear-region counter
    config          SearchConfig and the paper's search presets
    pruning         the pruning-based search
    search_run      a search in its run folder
    search_cli      the command line of prune_metantknas.py
    launch          the command line of prune_launch.py
"""
