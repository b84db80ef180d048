"""What every part of the toolkit uses; imports nothing else of the project.

Modules:
    openmp_env    OpenMP's spinning, bounded on import before torch loads (no other import)
    errors        typed user-facing errors, their exit codes, one-line messages
    utils         device selection, seeding and RNG states, atomic writes, JSONL, files of a run folder
    file_systems  the file system of a folder; network and cluster file systems
    pass_sizing   the size of a kernel pass, what a run learned of it, the faces of out-of-memory errors
    determinism   --deterministic: deterministic kernels on CUDA for a run's life
    provenance    provenance.json: what produced a run's numbers
    command_line  command-line plumbing: one-line errors, true/false flags, flags generated from configs, help
                  with one default per flag, other spellings of flags
    threads       thread counts: the user's, the affinity's, and ThreadTuner (chosen by timing)
    memory        --memory_budget, peak memory of a stretch of work
    distributed   torchrun: the world of processes; sharding and gathering
    folder_lock   one process per folder: flock, or a lease on a network file system; probes
    run_dir       the one owner of a run folder (search, training, study alike)
    session       the set-up of every run
    figures       the figure helpers every run picture uses, and the drawing of run folders
"""
