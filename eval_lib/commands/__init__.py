"""The command lines, on top of everything else.

Modules:
    presets         the paper's four runs: search and training settings, names
    original_flags  the paper repository's spellings of the three command lines (and the README's table)
    eval_command    eval_searched_arch.py
    search_command  prune_metantknas.py (the search, then --train_after_search)
    launch_command  prune_launch.py (the paper's presets)
    study_command   python -m eval_lib.proxy_study
    draw_pictures   python -m eval_lib.report
    sweep_jobs      the jobs of a sweep: command lines and the run folders they write
    sweep           python -m search_lib.sweep: several runs side by side on one box
"""
