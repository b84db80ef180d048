"""Run folders refuse what they did not create (issue 26): a file the toolkit would write in a run folder (the lock,
the logs, the *.jsonl records, a checkpoint, a temporary) that is a symbolic link, a second name of another file or
another user's is refused with exit 2 and one line naming it; the file it points to is left as it was. Leftover
temporaries of a killed run are removed when the folder is next claimed.
"""

from __future__ import annotations

import json
import os

import pytest
from test_batch_runs import SEARCH_FAST, TRAIN_TINY, _error_line

import eval_searched_arch
import prune_metantknas
from search_lib.core import utils
from search_lib.core.errors import ForeignFile
from search_lib.core.folder_lock import FolderLock
from search_lib.core.utils import append_jsonl, atomic_write_text
from search_lib.search.search_run import search_run_dir

THESIS = "\\documentclass{article} my thesis\n"


@pytest.fixture
def thesis(tmp_path):
    """A file of the user's that a hostile link in a shared runs folder points to."""
    path = tmp_path / "home" / "thesis.tex"
    path.parent.mkdir()
    path.write_text(THESIS)
    return path


def _refused(code: int, err: str, name: str, thesis) -> None:
    assert code == 2, err[-2000:]
    line = _error_line(err)
    assert name in line and "a symbolic link" in line and "remove it" in line, line
    assert thesis.read_text() == THESIS


@pytest.mark.parametrize("name", [".lock", "search.log", "history.jsonl", ".state.json.k3x9q2ab.tmp"])
def test_a_symlink_in_a_search_folder_is_refused_and_its_target_kept(name, thesis, synthetic_mini, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(thesis)
    code = prune_metantknas.main([*SEARCH_FAST, "--data_path", str(synthetic_mini), "--save_dir", str(run)])
    _refused(code, capsys.readouterr().err, str(run / name), thesis)
    assert sorted(p.name for p in run.iterdir()) == [name]  # nothing written beside it


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoint.pt", "train.log"])
def test_a_symlink_in_a_training_folder_is_refused_and_its_target_kept(name, thesis, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(thesis)
    code = eval_searched_arch.main([*TRAIN_TINY, "--save_dir", str(run)])
    _refused(code, capsys.readouterr().err, str(run / name), thesis)


def test_each_way_of_writing_refuses_a_link_a_second_name_and_another_users_file(thesis, tmp_path, monkeypatch):
    """The lock, an append, an atomic replace, a log and a rotation: never through a link, never into a file
    with another name (a hard link appended to changes the other name too), never another user's."""
    (tmp_path / ".lock").symlink_to(thesis)
    (tmp_path / "metrics.jsonl").symlink_to(thesis)
    (tmp_path / "results.json").symlink_to(thesis)
    (tmp_path / "search.log").symlink_to(thesis)
    for write in (lambda: FolderLock(tmp_path).acquire(), lambda: append_jsonl(tmp_path / "metrics.jsonl", {"a": 1}),
                  lambda: atomic_write_text(tmp_path / "results.json", "{}"),
                  lambda: search_run_dir(tmp_path).attach_log()):
        with pytest.raises(ForeignFile, match="is a symbolic link"):
            write()
    assert thesis.read_text() == THESIS and not list(tmp_path.glob(".*.tmp"))
    linked = tmp_path / "linked"
    linked.mkdir()
    os.link(thesis, linked / ".lock")
    with pytest.raises(ForeignFile, match="2 hard links"):
        FolderLock(linked).acquire()
    assert thesis.read_text() == THESIS
    other = tmp_path / "other"
    run = search_run_dir(other)
    run.create()
    (other / "state.json").write_text("{}")
    monkeypatch.setattr(utils.os, "geteuid", lambda: os.getuid() + 1)  # as seen by another user
    with pytest.raises(ForeignFile, match=r"state.json is owned by another user"):
        run.hold()
    with pytest.raises(ForeignFile, match="owned by another user"):
        run.save_state(lambda path: path.write_text("{}"))


def test_a_claim_removes_the_temporaries_of_a_killed_run_and_nothing_else(tmp_path):
    run = search_run_dir(tmp_path)
    left = [".state.json.k3x9q2ab.tmp", ".history.jsonl.0a_b1c2d.tmp", ".config.json.zzzzzzzz.tmp"]
    kept = [".notes.txt.k3x9q2ab.tmp", "my.tmp", ".state.json.tmp"]
    for name in left + kept:
        (tmp_path / name).write_text("x")
    assert run.claim() is False
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".lock", *kept])
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    finally:
        run.release()
