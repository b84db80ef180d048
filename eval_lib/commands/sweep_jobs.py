"""The jobs of a sweep (`eval_lib.commands.sweep`): a command line each, from a jobs file or the paper's presets
times seeds, with the run folder it writes, read by the parser of the project's script it runs (so a finished job
is skipped and one another process holds is reported)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from eval_lib.commands import eval_command, launch_command, search_command
from eval_lib.commands.presets import PRESET_NAMES
from search_lib.core.command_line import str2bool
from search_lib.core.errors import UsageError, one_line
from search_lib.core.folder_lock import FolderLock
from search_lib.core.run_dir import DONE_FILE

REPO = Path(__file__).resolve().parents[2]
# The project's scripts and the modules of their command lines.
SCRIPTS = {"prune_metantknas.py": "eval_lib.commands.search_command",
           "prune_launch.py": "eval_lib.commands.launch_command",
           "eval_searched_arch.py": "eval_lib.commands.eval_command"}
_PYTHON = re.compile(r"python[0-9.]*")


@dataclass
class Job:
    name: str
    argv: list[str]
    save_dir: Path | None
    train_after: bool  # --train_after_search: finished only when <save_dir>/train is done too
    status: str = "not run"  # ok / failed / skipped / running elsewhere / interrupted / not run
    exit_code: int | None = None
    wall_s: float | None = None
    log: str | None = None
    gpu: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    fh: IO | None = field(default=None, repr=False)
    t0: float = 0.0

    def folders(self) -> list[Path]:  # <save_dir>, and <save_dir>/train with --train_after_search
        return [] if self.save_dir is None else [self.save_dir] + [self.save_dir / "train"] * self.train_after

    def finished(self) -> bool:  # without a save_dir, always run (the scripts report a finished run)
        return bool(self.folders()) and all((f / DONE_FILE).is_file() for f in self.folders())

    def elsewhere(self) -> dict | None:
        """The record of another process holding one of the job's run folders, None when none is held."""
        return next((h for h in (FolderLock(f).holder() for f in self.folders()) if h is not None), None)

    def record(self) -> dict:
        return dict(job=self.name, status=self.status, exit_code=self.exit_code, wall_s=self.wall_s, log=self.log,
                    gpu=self.gpu, save_dir=None if self.save_dir is None else str(self.save_dir),
                    command=shlex.join(self.argv))


# ---- the job list -----------------------------------------------------------------------------------------

def read_jobs_file(path: str) -> list[list[str]]:
    """One argv per command line of ``path``; blank lines and ``#`` comments are ignored, quoting as in sh."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --jobs_file {path}: {getattr(exc, 'strerror', None) or one_line(exc, 100)}; "
                         f"give a text file with one command line per line") from None
    commands = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            argv = shlex.split(line, comments=True)
        except ValueError as exc:  # an unclosed quote
            raise UsageError(f"--jobs_file {path} line {number}: {exc}; fix the quoting") from None
        if argv:
            commands.append(argv)
    if not commands:
        raise UsageError(f"--jobs_file {path} holds no command line; write one job per line")
    return commands


def preset_commands(presets: Sequence[str], seeds: Sequence[int], save_root: str) -> list[list[str]]:
    return [["prune_launch.py", "--dataset", PRESET_NAMES[name][0], "--cells", str(PRESET_NAMES[name][1]),
             "--rand_seed", str(seed), "--save_dir", str(Path(save_root) / f"{name}-seed{seed}")]
            for name in presets for seed in seeds]


def _script(name: str) -> list[str]:
    """How this interpreter runs one of the project's scripts: the file of this checkout, or (the toolkit installed
    with pip, no checkout around it) the module behind it."""
    path = REPO / name
    return [str(path)] if path.is_file() else ["-m", SCRIPTS[name]]


def resolve(argv: Sequence[str]) -> list[str]:
    """The project's scripts run with this interpreter from this checkout (or installation), whatever the current
    folder; ``python`` is this interpreter (its virtualenv); any other program runs as given (no shell)."""
    argv = list(argv)
    if argv[0] in SCRIPTS:
        return [sys.executable, *_script(argv[0]), *argv[1:]]
    if _PYTHON.fullmatch(argv[0]):
        if len(argv) > 1 and argv[1] in SCRIPTS and not Path(argv[1]).exists():
            return [sys.executable, *_script(argv[1]), *argv[2:]]
        return [sys.executable, *argv[1:]]
    return argv


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """``--name X`` or ``--name=X`` (the last one wins, as in argparse); None when absent."""
    value = None
    for i, tok in enumerate(argv):
        if tok == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith(f"--{name}="):
            value = tok.split("=", 1)[1]
    return value


def bool_flag(argv: Sequence[str], name: str) -> bool:
    """A project true/false flag: ``--name``, ``--name true|false``, ``--name=...``, ``--no-name``."""
    on = False
    for i, tok in enumerate(argv):
        if tok == f"--no-{name}":
            on = False
        elif tok == f"--{name}" or tok.startswith(f"--{name}="):
            word = tok.split("=", 1)[1] if "=" in tok else (argv[i + 1] if i + 1 < len(argv) else "true")
            try:
                on = str2bool(word)
            except argparse.ArgumentTypeError:  # the next token is another flag: a bare --name
                on = True
    return on


def _search_folders(args: list[str]) -> tuple[str | None, bool]:
    cfg = search_command.config_from_args(search_command.build_parser().parse_args(args), notes=False)
    return cfg.save_dir, cfg.train_after_search


def _launch_folders(args: list[str]) -> tuple[str | None, bool]:
    parsed = launch_command.build_parser().parse_args(args)
    return launch_command.run_folder(parsed), bool(parsed.train_after_search)


def _eval_folders(args: list[str]) -> tuple[str | None, bool]:
    return eval_command.config_from_args(eval_command.build_parser().parse_args(args), notes=False).save_dir, False


_FOLDERS = {"prune_metantknas.py": _search_folders, "prune_launch.py": _launch_folders,
            "eval_searched_arch.py": _eval_folders}


def job_folder(argv: Sequence[str]) -> tuple[Path | None, bool]:
    """(run folder, trains after its search) of a resolved job. The project's scripts are read by their own
    parsers, so every spelling of a flag counts (RFS's --model_path, the launcher's default folder of a fixed seed);
    a line the parser refuses has no folder (the job runs and its log says why). Any other program: the
    --save_dir and --train_after_search it is given."""
    script, args = None, []
    if len(argv) > 2 and argv[0] == sys.executable and argv[1] == "-m":
        script = next((name for name, module in SCRIPTS.items() if module == argv[2]), None)
        args = list(argv[3:])
    elif len(argv) > 1 and argv[0] == sys.executable:
        script, args = Path(argv[1]).name, list(argv[2:])
    reader = _FOLDERS.get(script)
    if reader is None:
        save = flag_value(argv, "save_dir")
        return (Path(save) if save else None), bool_flag(argv, "train_after_search")
    try:  # quietly: the job's own run says what is wrong with its line, in its log
        with contextlib.redirect_stderr(io.StringIO()):
            save, train_after = reader(args)
    except (UsageError, SystemExit):  # SystemExit: argparse refused the line
        return None, False
    return (Path(save) if save else None), train_after


def make_jobs(commands: Sequence[Sequence[str]]) -> list[Job]:
    """One job per command line (the project's scripts resolved), named after its run folder."""
    jobs, used = [], set()
    for i, argv in enumerate(commands):
        argv = resolve(argv)
        save_dir, train_after = job_folder(argv)
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", save_dir.name).strip("._") if save_dir else ""
        name, n = base or f"job{i}", 1
        while name in used:  # two jobs with the same folder name (or the same folder) keep apart logs
            n += 1
            name = f"{base or f'job{i}'}-{n}"
        used.add(name)
        jobs.append(Job(name, argv, save_dir, train_after))
    return jobs


