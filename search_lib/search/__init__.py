"""The pruning search (docs/method.md §4), in the order its modules run one another (tests/test_layout.py):

Modules:
    kernels         empirical NTK (Opacus per-sample gradients), analytical MetaNTK, condition numbers
    linear_regions  TE-NAS linear-region counting
    ranking         seeds of the repeats, rounding and ranks of the scores, log ranks
    zc_gradients    zero-cost proxies from gradients: grad_norm, snip, grasp, fisher, jacob_cov, synflow, zico
    zc_activations  zero-cost proxies from activations: naswot, swap, meco
    zero_cost       ZERO_COST_PROXIES, the registry of the ten, and their directions
    objectives      --objective: the objectives, their directions, changes and combinations (§4b)
    search_config   SearchConfig (the search's flags), validated and resolved once
    scoring         CandidateScorer: κ and linear regions of architectures, one or many per pass; proxies
    pruning         the pruning rounds and their resumable state
    search_plot     search.png
    search_run      a search in its run folder (set-up, resume, outputs)
"""
