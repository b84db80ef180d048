"""The search space and the networks built from it.

Modules:
    ops        operation registry of the search spaces
    space      a search space resolved once (ops, edge keys, edge groups: the cell topology)
    genotypes  the genotype value type, parsing, presets, derivation from alphas, genotype.json
    supernet   the DARTS-style cell supernet (search network), its thin variant, norms, initialisation
"""
