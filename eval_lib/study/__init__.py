"""The proxy study: do training-free proxies predict few-shot accuracy? (docs/proxy_study.md)

Modules:
    zc_gradients    zero-cost proxies from gradients: grad_norm, snip, grasp, fisher, jacob_cov, synflow, zico
    zc_activations  zero-cost proxies from activations: naswot, swap, meco
    proxies         the proxies of the study; ZERO_COST_PROXIES, the registry of zero-cost proxies
    study_config    StudyConfig and the studied architectures
    study_stats     rank and partial rank correlations, bootstrap intervals, combined rankings, the table
    study_plot      study.png
    study_run       the study in its folder (shards, resume, summary)
"""
