"""The proxy study: do training-free proxies predict few-shot accuracy? (docs/proxy_study.md)

Modules:
    proxies         the proxies of the study (the zero-cost ones: search_lib.search.zero_cost.ZERO_COST_PROXIES)
    study_config    StudyConfig and the studied architectures
    study_stats     rank and partial rank correlations, bootstrap intervals, combined rankings, the table
    study_plot      study.png
    study_run       the study in its folder (shards, resume, summary)
"""
