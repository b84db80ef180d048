"""Training-free architecture search for few-shot learning (MetaNTK-NAS).

Modules:
    errors      typed user-facing errors and their exit codes
    utils       device selection, seeding, atomic writes
    ops         operation registry of the search spaces
    genotypes   genotype value type, parsing, presets, derivation from alphas
    supernet    the DARTS-style cell supernet (search network) and its thin variant
    data        few-shot data: RFS mini/tieredImageNet loaders, the digits demo, transforms, episodes
    synthetic   writer of synthetic data in the RFS file formats
    kernels     empirical NTK, analytical MetaNTK, condition numbers
    linear_regions  TE-NAS linear-region counter
    pruning     the pruning-based search
"""
