"""What every part of the toolkit uses; imports nothing else of the project.

Modules:
    errors        typed user-facing errors, their exit codes, one-line messages
    utils         device selection, seeding and RNG states, atomic writes, JSONL
    command_line  command-line plumbing: one-line errors, true/false flags, flags generated from configs, help
                  with one default per flag, other spellings of flags
    threads       thread counts: the user's, the affinity's, and ThreadTuner (chosen by timing)
    memory        --memory_budget, peak memory of a stretch of work, the measured pass size
    distributed   torchrun: the world of processes; sharding and gathering
    run_dir       the one owner of a run folder (search, training, study alike) and its lock
    figures       the figure helpers every run picture uses, and the drawing of run folders
"""
