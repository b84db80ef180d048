"""The pruning search (docs/method.md §4), in the order its modules run one another (tests/test_layout.py):

Modules:
    search_config   SearchConfig (the search's flags), validated and resolved once
    kernels         empirical NTK (Opacus per-sample gradients), analytical MetaNTK, condition numbers
    linear_regions  TE-NAS linear-region counting
    ranking         seeds of the repeats, rounding and ranks of the scores
    scoring         CandidateScorer: κ and linear regions of architectures, one or many per pass
    pruning         the pruning rounds and their resumable state
    search_plot     search.png
    search_run      a search in its run folder (set-up, resume, outputs)
"""
