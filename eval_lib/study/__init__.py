"""The proxy study: do training-free proxies predict few-shot accuracy? (docs/proxy_study.md)

Modules:
    proxies         the proxies of the study (the zero-cost ones: search_lib.search.zero_cost.ZERO_COST_PROXIES)
    study_config    StudyConfig, the studied architectures and the training seeds (--train_seeds)
    study_trainings a genotype trained and tested once per training seed; the mean and spread of its accuracy
    study_stats     rank and partial rank correlations, bootstrap intervals, combined rankings, the seed-to-seed
                    ceiling
    study_table     the summary as a text table (summary.txt)
    study_plot      study.png
    study_run       the study in its folder (shards, resume, summary)
"""
