"""Training-free architecture search for few-shot learning (MetaNTK-NAS): the base package.

Everything the search needs lives here; `eval_lib` (training, few-shot test, proxy study) builds on it, and
nothing here imports `eval_lib` (tests/test_structure.py keeps it so). The method is docs/method.md.

Modules:
    errors          typed user-facing errors, their exit codes, one-line messages
    cli             command-line plumbing: one-line errors, true/false flags, flags generated from configs, help
                    with one default per flag, other spellings of flags
    original_flags  the paper repository's spellings of the three command lines (and the README's table)
    utils           device selection, seeding, atomic writes, JSONL
    threads         thread counts: the user's, the affinity's, and ThreadTuner (chosen by timing)
    memory          --memory_budget, peak memory of a stretch of work, the measured pass size
    run_dir         the one owner of a run folder (search and training alike), its lock
    distributed     torchrun: the world of processes; sharding and gathering
    ops             operation registry of the search spaces
    space           a search space resolved once (ops, edge keys, edge groups: the cell topology)
    genotypes       the genotype value type, parsing, presets, derivation from alphas, genotype.json
    supernet        the DARTS-style cell supernet (search network), its thin variant, norms, initialisation
    data            few-shot data: names, RFS / digits loaders, transforms, episodes, search samplers
    synthetic       writer of synthetic data in the RFS file formats
    kernels         empirical NTK (Opacus per-sample gradients), analytical MetaNTK, condition numbers
    linear_regions  TE-NAS linear-region counting
    config          SearchConfig (the search's flags) and the paper's search presets
    ranking         seeds of the repeats, rounding and ranks of the scores
    scoring         CandidateScorer: κ and linear regions of architectures, one or many per pass
    pruning         the pruning rounds and their resumable state
    search_run      a search in its run folder (resume, outputs)
    report          search.png, and the figure helpers the training's picture shares
    sweep           several runs side by side on one box (python -m search_lib.sweep)
"""
