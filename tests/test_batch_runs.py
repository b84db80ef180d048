"""Unattended batch runs (issue 5): kill-and-resume, bad input through the real command lines, exit codes,
corrupt state and checkpoint files, numerical sentinels, determinism.

The subprocess tests run the entry points as cron would (``python prune_metantknas.py ...`` from the
repository root; the table of bad inputs forks each command line from one interpreter that imported the
scripts once), so no traceback can hide behind an in-process ``main``. Every setting is tiny: a search
scores the supernet with linear regions only (``--only_lrs``; the kernel path is covered in-process on a
reduced candidate set and by the slow variant of the kill test), training uses a 2-cell 4-channel network on
the built-in Digits data.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_searched_arch
import prune_metantknas
import search_lib.search.pruning as pruning
import search_lib.search.scoring as scoring
from eval_lib.train.checkpoints import read_checkpoint
from search_lib.models.genotypes import PRESETS
from search_lib.models.ops import space_ops
from search_lib.models.space import edge_keys
from search_lib.search.pruning import scores_text

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LIMIT = 240  # seconds any one subprocess may take before the test fails (nothing hangs)

# A search of a few seconds: linear regions only, 7 ops -> 4 -> 1 in two rounds, then one edge round.
SEARCH_FAST = ["--dataset", "MiniImageNet", "--ntk_type", "NTK", "--only_lrs", "--ntk_channels", "4",
               "--ntk_layers", "5", "--image_size", "8", "--batch_size", "2", "--repeat", "1", "--prune_number", "3",
               "--lr_batch_size", "300", "--lr_batches", "1", "--device", "cpu", "--rand_seed", "0"]
# The same with the MetaNTK (MAML) kernel: about a minute per run on 2 cores (slow test).
SEARCH_META = ["--dataset", "MetaMiniImageNet", "--ntk_type", "MetaNTK_anl", "--ntk_channels", "4",
               "--ntk_layers", "2", "--image_size", "8", "--batch_size", "2", "--repeat", "1", "--prune_number", "3",
               "--lr_batch_size", "100", "--lr_batches", "1", "--device", "cpu", "--rand_seed", "0"]
TRAIN_TINY = ["--genotype", "mini-5cell-1", "--dataset", "Digits", "--init_channels", "4", "--layers", "2",
              "--epochs", "3", "--image_size", "16", "--batch_size", "64", "--n_shots", "1", "--n_queries", "5",
              "--n_test_runs", "5", "--n_aug_support_samples", "1", "--eval_splits", "test", "--num_workers", "0",
              "--device", "cpu", "--no-progress", "--seed", "1"]


# --------------------------------------------------------------------------------------------------
# helpers


def _cmd(script: str, *args) -> list[str]:
    return [sys.executable, str(REPO / script), *map(str, args)]


def _search_cmd(data, save_dir, args=SEARCH_FAST) -> list[str]:
    return _cmd("prune_metantknas.py", *args, "--data_path", data, "--save_dir", save_dir)


def _train_cmd(save_dir, *extra) -> list[str]:
    return _cmd("eval_searched_arch.py", *TRAIN_TINY, "--save_dir", save_dir, *extra)


def _run(cmd, timeout=LIMIT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


class _Background:
    """A command running alongside the test (output to files, so no pipe can fill up)."""

    def __init__(self, cmd, log_dir: Path, name: str):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out, self.err = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err)

    def wait(self, timeout=LIMIT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stderr(self) -> str:
        return self.err.read_text()


def _wait_until(cond, proc: _Background, timeout=LIMIT, what="") -> None:
    """Poll `cond` every 20 ms while `proc` runs; fail when it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.proc.returncode}) before {what}: {proc.stderr()[-1500:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _saved_round(save_dir: Path) -> int:
    try:
        return int(json.loads((save_dir / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return -1


def _snapshot(path: Path) -> dict | None:
    """sha256 of every file under `path` (or of `path` itself); None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _same_bytes(a: Path, b: Path, *names: str) -> None:
    """The files are byte-identical; for history.jsonl, all but what each round measured on its run (its pass
    sizes, peak memory, thread counts and seconds: `search_lib.search.pruning.scores_text`)."""
    for name in names:
        if name == "history.jsonl":
            assert scores_text(a / name) == scores_text(b / name), f"{name} differs between {a} and {b}"
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"


def _error_line(stderr: str) -> str:
    """The whole of stderr must be one line "error: ..." (no traceback, no warnings around it)."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# --------------------------------------------------------------------------------------------------
# reference runs (started in the background by the first test that needs them)


def _reference_run(tmp_path_factory, name: str, make_cmd):
    """Start a run in the background; `get()` waits for it (once) and returns its folder."""
    root = tmp_path_factory.mktemp(f"{name}_ref")
    bg = _Background(make_cmd(root / "run"), root, name)
    finished = []

    def get() -> Path:
        if not finished:
            assert bg.wait() == 0, bg.stderr()[-2000:]
            finished.append(True)
        return root / "run"

    return bg, get


@pytest.fixture(scope="module")
def search_ref(synthetic_mini, tmp_path_factory):
    """An uninterrupted fast search (treat its folder as read-only)."""
    bg, get = _reference_run(tmp_path_factory, "search", lambda out: _search_cmd(synthetic_mini, out))
    yield get
    bg.kill()


@pytest.fixture(scope="module")
def train_ref(tmp_path_factory):
    """An uninterrupted tiny training + few-shot test (treat its folder as read-only)."""
    bg, get = _reference_run(tmp_path_factory, "train", _train_cmd)
    yield get
    bg.kill()


# --------------------------------------------------------------------------------------------------
# 1. kill and resume


def _kill_and_resume_search(data, args, ref_dir_of, tmp_path) -> None:
    run = tmp_path / "run"
    proc = _Background(_search_cmd(data, run, args), tmp_path, "killed")
    try:
        _wait_until(lambda: _saved_round(run) >= 1, proc, what="the first round was saved")
        proc.kill()
    finally:
        proc.kill()
    state = json.loads((run / "state.json").read_text())
    assert not (run / "done").exists() and state["phase"] != "done", "the search finished before the kill"
    assert len(state["history"]) == state["round"] >= 1
    # the lock file still names the killed process, but the operating system dropped its lock: the re-run takes it
    assert json.loads((run / ".lock").read_text())["pid"] == proc.proc.pid
    resumed = _run(_search_cmd(data, run, args))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at round {state['round']}" in resumed.stderr
    ref = ref_dir_of()
    _same_bytes(run, ref, "genotype.json", "history.jsonl")
    assert (run / "done").exists()


def test_search_killed_after_a_round_resumes_to_the_same_result(synthetic_mini, search_ref, tmp_path):
    _kill_and_resume_search(synthetic_mini, SEARCH_FAST, search_ref, tmp_path)


@pytest.mark.slow
def test_metantk_search_killed_after_a_round_resumes_to_the_same_result(synthetic_mini, tmp_path):
    ref = _Background(_search_cmd(synthetic_mini, tmp_path / "ref", SEARCH_META), tmp_path, "ref")

    def ref_dir() -> Path:
        assert ref.wait() == 0, ref.stderr()[-2000:]
        return tmp_path / "ref"

    try:
        _kill_and_resume_search(synthetic_mini, SEARCH_META, ref_dir, tmp_path)
    finally:
        ref.kill()


def test_training_killed_after_an_epoch_resumes_to_the_same_weights(train_ref, tmp_path):
    run = tmp_path / "run"
    proc = _Background(_train_cmd(run), tmp_path, "killed")
    try:
        _wait_until(lambda: (run / "checkpoint.pt").exists(), proc, what="the first checkpoint was written")
        proc.kill()
    finally:
        proc.kill()
    assert not (run / "done").exists(), "the training finished before the kill"
    assert read_checkpoint(run / "checkpoint.pt")["epoch"] < 3
    resumed = _run(_train_cmd(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at epoch" in resumed.stderr
    ref = train_ref()
    a, b = read_checkpoint(run / "checkpoint.pt"), read_checkpoint(ref / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    res, ref_res = (json.loads((d / "results.json").read_text()) for d in (run, ref))
    assert res["fewshot"]["test"]["1"]["accuracies"] == ref_res["fewshot"]["test"]["1"]["accuracies"]
    for phase in ("train", "test"):  # each phase's peak memory (this session's), whatever the run's history
        assert res["memory"][phase]["measure"] == "process_rss" and 100 << 20 < res["memory"][phase]["peak_bytes"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_metrics = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["loss"], m["acc"]) for m in metrics] == [(m["epoch"], m["loss"], m["acc"])
                                                                    for m in ref_metrics]


# --------------------------------------------------------------------------------------------------
# 2. bad input through the real command lines: exit code, one line, no traceback, nothing overwritten

GENO_OK = str(PRESETS["mini-5cell-1"])
GENO_MALFORMED = "Genotype(normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)]"
GENO_UNKNOWN_OP = GENO_OK.replace("('conv_3x3', 0)", "('bogus_op', 0)", 1)
GENO_INDEX = GENO_OK.replace("('conv_3x3', 0)", "('conv_3x3', 7)", 1)
GENO_MIXED = GENO_OK.replace("('conv_3x3', 0)", "('sep_conv_5x5', 0)", 1)  # a `darts` op among darts_fewshot ops


def _genotype_record(geno: dict, space="darts_fewshot", max_nodes=3) -> str:
    """A search's genotype.json (see search_lib.models.genotypes.GenotypeRecord)."""
    return json.dumps({"genotype": geno, "string": "", "search_space": space, "max_nodes": max_nodes,
                       "rand_seed": 0})


def _make_inputs(root: Path, data: Path, search_dir: Path, train_dir: Path) -> dict[str, Path]:
    """Bad data folders, genotype files and output folders the table refers to by name."""
    p = {"root": root, "data": data}
    p["empty"] = root / "empty"
    p["empty"].mkdir()
    train_file = "miniImageNet_category_split_train_phase_train.pickle"
    good = pickle.loads((data / train_file).read_bytes())
    for name, obj in {"wrong_keys": {"images": good["data"], "targets": good["labels"]},
                      "wrong_shape": {"data": np.transpose(good["data"], (0, 3, 1, 2)).copy(),
                                      "labels": good["labels"]}}.items():
        folder = root / name
        folder.mkdir()
        (folder / train_file).write_bytes(pickle.dumps(obj, protocol=2))
        p[name] = folder
    geno = PRESETS["mini-5cell-1"].to_dict()
    four = dict(geno, normal=geno["normal"] + [[["sep_conv_3x3", 0], ["conv_3x3", 4]]], normal_concat=[2, 3, 4, 5],
                reduce=geno["reduce"] + [[["sep_conv_3x3", 0], ["conv_3x3", 4]]], reduce_concat=[2, 3, 4, 5])
    (root / "geno_4nodes.json").write_text(_genotype_record(four))
    other = json.loads(json.dumps(geno))
    other["normal"][0][0][0] = "sep_conv_5x5"
    (root / "geno_darts_op.json").write_text(_genotype_record(other))
    p["geno_4nodes"], p["geno_darts_op"] = root / "geno_4nodes.json", root / "geno_darts_op.json"
    p["a_file"] = root / "a_file"
    p["a_file"].write_text("not a folder\n")
    p["finished_search"], p["finished_train"] = search_dir, train_dir
    return p


# (id, script, argument builder, exit code, words the message must contain, output folder before the run)
#   folder: "absent" (must not be created), "search" / "train" (a copy of a finished run; must stay unchanged),
#   "file" (a path below a regular file; the file must stay unchanged)
S, E, L = "prune_metantknas.py", "eval_searched_arch.py", "prune_launch.py"
D = "--data_path"


def _search(*extra, data="data"):
    return lambda p, out: [*SEARCH_FAST, D, p[data], "--save_dir", out, *extra]


def _meta(*extra, data="data"):
    return _search("--dataset", "MetaMiniImageNet", "--ntk_type", "MetaNTK_anl", *extra, data=data)


def _train(*extra):
    return lambda p, out: [*TRAIN_TINY, "--save_dir", out, *extra]


def _geno(spec):
    return lambda p, out: [*TRAIN_TINY, "--save_dir", out, "--genotype", p[spec] if spec in p else spec]


BAD_INPUTS = [
    ("search-data-missing", S, lambda p, out: [*SEARCH_FAST, D, p["root"] / "nowhere", "--save_dir", out], 3,
     ["data folder not found", "nowhere"], "absent"),
    ("search-data-empty", S, _search(data="empty"), 3, ["file not found", "train_phase_train"], "absent"),
    ("search-data-wrong-keys", S, _search(data="wrong_keys"), 3, ["no key 'data'"], "absent"),
    ("search-data-wrong-shape", S, _search(data="wrong_shape"), 3, ["shape", "(N, H, W, 3)"], "absent"),
    ("search-too-few-classes", S, _meta("--n_ways", "10"), 3, ["6 classes", "n_ways=10"], "absent"),
    ("search-too-few-images", S, _meta("--n_shots", "10", "--n_queries", "5"), 3, ["needs 15"], "absent"),
    ("search-metantk-non-episodic", S, _search("--ntk_type", "MetaNTK_anl"), 2, ["episodic", "MetaMiniImageNet"],
     "search"),
    ("search-groupnorm-channels", S, _search("--ntk_channels", "20"), 2, ["groupnorm16", "20 channels"], "absent"),
    ("search-8-cells-bad-ntk-N", S, _search("--ntk_layers", "8", "--ntk_N", "1"), 2, ["--ntk_N 1", "--ntk_N 2"],
     "search"),
    ("search-cuda-without-cuda", S, _search("--device", "cuda"), 2, ["CUDA is not available"], "search"),
    ("search-save-dir-unwritable", S, lambda p, out: [*SEARCH_FAST, D, p["data"], "--save_dir", p["a_file"] / "run"],
     4, ["cannot write --save_dir", "Not a directory"], "file"),
    ("search-save-dir-other-config", S, _search("--repeat", "2", "--prune_number", "2"), 2,
     ["different config", "prune_number: 3 -> 2", "repeat: 1 -> 2", "--overwrite"], "search"),
    ("eval-genotype-malformed", E, _geno(GENO_MALFORMED), 2, ["malformed genotype"], "train"),
    ("eval-genotype-unknown-op", E, _geno(GENO_UNKNOWN_OP), 2, ["unknown operation 'bogus_op'"], "train"),
    ("eval-genotype-index-out-of-range", E, _geno(GENO_INDEX), 2, ["input index 7 out of range"], "train"),
    ("eval-genotype-mixed-spaces", E, _geno(GENO_MIXED), 2, ["different search spaces", "sep_conv_5x5"], "train"),
    ("eval-genotype-json-other-space", E, _geno("geno_darts_op"), 2,
     ["unknown operation 'sep_conv_5x5'", "darts_fewshot"], "train"),
    ("eval-genotype-json-other-node-count", E, _geno("geno_4nodes"), 2, ["4 nodes", "needs 3"], "train"),
    ("eval-unknown-preset", E, _geno("mini-9cell-1"), 2, ["mini-9cell-1", "presets"], "train"),
    ("eval-save-dir-unwritable", E, lambda p, out: [*TRAIN_TINY, "--save_dir", p["a_file"] / "run"], 4,
     ["cannot create --save_dir", "Not a directory"], "file"),
    ("launch-unknown-cells", L, lambda p, out: ["--dataset", "mini", "--cells", "6", D, p["data"], "--save_dir", out],
     2, ["--cells", "invalid choice"], "absent"),
    ("launch-data-missing", L, lambda p, out: ["--dataset", "mini", "--cells", "5", D, p["root"] / "nowhere",
                                               "--save_dir", out, "--device", "cpu"], 3,
     ["data folder not found"], "absent"),
]
CUDA_ROWS = {"search-cuda-without-cuda"}


# One interpreter imports the three entry points once, then forks a child per command line: the child runs
# the script's ``main(argv)`` from the repository root with its stdout and stderr in files and exits with its
# return value, as ``python script.py argv`` would (an exception escaping main prints its traceback and exits
# 1, like the interpreter). Starting python and torch 22 times cost ~90 s of the suite; a fork costs ms.
FORK_RUNNER = r"""
import importlib, json, os, sys, time, traceback
mods = {s: importlib.import_module(s[:-3]) for s in ("prune_metantknas.py", "eval_searched_arch.py",
                                                      "prune_launch.py")}
out = {}
for job in json.load(sys.stdin):
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            f = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
        sys.argv = [job["script"], *job["argv"]]
        try:
            code = mods[job["script"]].main(job["argv"])
            code = 0 if code is None else int(code)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out[job["id"]] = {"code": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - t0}
print(json.dumps(out))
"""


def _run_rows(rows, paths: dict, work: Path) -> dict:
    """Every row's command line in a forked child of one interpreter (see FORK_RUNNER); the watched folder or
    file of each row is snapshotted before any runs and after all have run."""
    work.mkdir(parents=True, exist_ok=True)
    jobs, results = [], {}
    for rid, script, build, _code, _words, folder in rows:
        out = work / rid
        if folder in ("search", "train"):
            shutil.copytree(paths[f"finished_{folder}"], out)
        watched = paths["a_file"] if folder == "file" else out
        results[rid] = {"watched": watched, "before": _snapshot(watched)}
        jobs.append({"id": rid, "script": script, "argv": [str(a) for a in build(paths, out)],
                     "stdout": str(work / f"{rid}.stdout"), "stderr": str(work / f"{rid}.stderr")})
    proc = subprocess.run([sys.executable, "-c", FORK_RUNNER], cwd=REPO, env=ENV, input=json.dumps(jobs),
                          capture_output=True, text=True, timeout=LIMIT)
    assert proc.returncode == 0, proc.stderr
    ran = json.loads(proc.stdout.strip().splitlines()[-1])
    for job in jobs:
        res = results[job["id"]]
        res.update(ran[job["id"]], stdout=Path(job["stdout"]).read_text(), stderr=Path(job["stderr"]).read_text(),
                   after=_snapshot(res.pop("watched")))
    return results


@pytest.fixture(scope="module")
def bad_input_results(synthetic_mini, search_ref, train_ref, tmp_path_factory):
    """Run every row of BAD_INPUTS as its command line (forked from one interpreter, see FORK_RUNNER)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    paths = _make_inputs(root, Path(synthetic_mini), search_ref(), train_ref())
    rows = [r for r in BAD_INPUTS if not (r[0] in CUDA_ROWS and torch.cuda.is_available())]
    results = _run_rows(rows, paths, root / "out")
    lines = [f"{rid}: exit {res['code']} ({res['seconds']:.1f} s): {res['stderr'].strip()}"
             for rid, res in results.items()]
    (root / "table.txt").write_text("\n".join(lines) + "\n")  # the table of the closing note
    return results


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_one_line_exit_code_nothing_overwritten(row, bad_input_results):
    rid, _script, _build, code, words, folder = row
    if rid in CUDA_ROWS and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    res = bad_input_results[rid]
    assert res["code"] == code, res["stderr"]
    line = _error_line(res["stderr"])
    for w in words:
        assert w in line, (w, line)
    if folder == "absent":
        assert res["after"] is None, f"{rid} created its output folder"
    else:
        assert res["before"] is not None and res["after"] == res["before"], f"{rid} changed {folder} files"
    assert "Traceback" not in res["stdout"]


def test_launcher_returns_the_search_exit_code(bad_input_results):
    assert bad_input_results["launch-data-missing"]["code"] == bad_input_results["search-data-missing"]["code"] == 3


# --------------------------------------------------------------------------------------------------
# 3. out of memory: exit 4 and a message naming the flag that lowers memory (in-process, patched)


@pytest.mark.parametrize("exc", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_MEMORY")],
                         ids=["OutOfMemoryError", "cudnn"])
def test_out_of_memory_exit_4_names_batch_size(exc, synthetic_mini, monkeypatch, capsys, tmp_path):
    def boom(*_a, **_k):
        raise exc

    monkeypatch.setattr(pruning.PruningSearch, "run", boom)
    argv = [*SEARCH_FAST, D, str(synthetic_mini), "--save_dir", str(tmp_path / "s")]
    assert prune_metantknas.main(argv) == 4
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "out of memory" in line[0] and "--batch_size" in line[0] and "Traceback" not in err
    monkeypatch.setattr("eval_lib.train.training_run.train_one_epoch", boom)
    assert eval_searched_arch.main(TRAIN_TINY + ["--save_dir", str(tmp_path / "t")]) == 4
    line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "--batch_size" in line[0]


def test_other_runtime_errors_are_not_disguised_as_out_of_memory(synthetic_mini, monkeypatch, tmp_path):
    def boom(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pruning.PruningSearch, "run", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        prune_metantknas.main([*SEARCH_FAST, D, str(synthetic_mini), "--save_dir", str(tmp_path / "s")])


# --------------------------------------------------------------------------------------------------
# 4. corrupt or truncated state / checkpoint files (in-process)


def _state_after(history: list[dict], rounds: int) -> dict:
    """The state.json a darts_fewshot / 3-node search saved after `rounds` rounds, rebuilt from its history."""
    ops, keys = space_ops("darts_fewshot"), edge_keys(3)
    alive = np.ones((2, len(keys), len(ops)), dtype=bool)
    alive[:, :, ops.index("none")] = False
    for rec in history[:rounds]:
        for c in rec["candidates"]:
            if c.get("pruned"):
                cell, edge = ("normal", "reduce").index(c["cell"]), keys.index(c["edge"])
                if c["op"] is None:
                    alive[cell, edge, :] = False
                else:
                    alive[cell, edge, ops.index(c["op"])] = False
    return {"version": pruning.STATE_VERSION, "round": rounds, "phase": history[rounds - 1]["phase"],
            "alive": alive.tolist(), "history": history[:rounds]}


def _resume_copy(ref: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for name in ("done", "genotype.json", "state.prev.json", "search.log"):
        (run / name).unlink(missing_ok=True)
    return run


def test_corrupt_search_state_falls_back_to_the_previous_one(synthetic_mini, search_ref, tmp_path):
    ref = search_ref()
    run = _resume_copy(ref, tmp_path)
    history = [json.loads(line) for line in (ref / "history.jsonl").read_text().splitlines()]
    assert (run / "state.json").read_bytes() == (ref / "state.json").read_bytes()
    (run / "state.prev.json").write_text(json.dumps(_state_after(history, 1)))
    text = (run / "state.json").read_text()
    (run / "state.json").write_text(text[: len(text) // 2])  # killed mid-write on a non-atomic filesystem
    argv = [*SEARCH_FAST, D, str(synthetic_mini), "--save_dir", str(run)]
    assert prune_metantknas.main(argv) == 0
    log = (run / "search.log").read_text()
    assert "state.json is unreadable" in log and "resuming at round 1" in log
    assert (run / "state.json.corrupt").exists()
    _same_bytes(run, ref, "genotype.json", "history.jsonl")


def test_both_search_states_corrupt_restart_from_round_0(synthetic_mini, search_ref, monkeypatch, tmp_path):
    run = _resume_copy(search_ref(), tmp_path)
    (run / "state.json").write_bytes(b"\x00\x01 not json")
    (run / "state.prev.json").write_text("[1, 2, 3]\n")  # valid JSON, not a state
    given = []
    monkeypatch.setattr(pruning.PruningSearch, "run", lambda self, state=None: given.append(state) or PRESETS[
        "mini-5cell-1"])
    assert prune_metantknas.main([*SEARCH_FAST, D, str(synthetic_mini), "--save_dir", str(run)]) == 0
    assert given == [None]  # the search starts from round 0
    log = (run / "search.log").read_text()
    assert "state.json is unreadable" in log and "state.prev.json is unreadable" in log
    assert "no readable search state" in log and "starting again from round 0" in log
    assert (run / "state.json.corrupt").exists() and (run / "state.prev.json.corrupt").exists()


def test_done_search_with_unreadable_genotype_json_is_rebuilt(synthetic_mini, search_ref, capsys, tmp_path):
    ref = search_ref()
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    (run / "genotype.json").write_text('{"genotype": {"normal": [[')
    assert prune_metantknas.main([*SEARCH_FAST, D, str(synthetic_mini), "--save_dir", str(run)]) == 0
    assert "genotype.json is unreadable" in capsys.readouterr().err
    _same_bytes(run, ref, "genotype.json", "history.jsonl")


def _train_copy(ref: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for name in ("done", "results.json", "train.log"):
        (run / name).unlink(missing_ok=True)
    return run


def _same_training(run: Path, ref: Path) -> None:
    a, b = read_checkpoint(run / "checkpoint.pt")["model"], read_checkpoint(ref / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res, ref_res = (json.loads((d / "results.json").read_text()) for d in (run, ref))
    assert res["fewshot"]["test"]["1"]["accuracies"] == ref_res["fewshot"]["test"]["1"]["accuracies"]


def test_both_checkpoints_corrupt_restart_training(train_ref, tmp_path):
    ref = train_ref()
    run = _train_copy(ref, tmp_path)
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:1000])  # truncated
    (run / "checkpoint_prev.pt").write_bytes(b"PK\x03\x04 garbage")
    assert eval_searched_arch.main(TRAIN_TINY + ["--save_dir", str(run)]) == 0
    log = (run / "train.log").read_text()
    assert "checkpoint.pt is unusable" in log and "checkpoint_prev.pt is unusable" in log
    assert "starts again from epoch 1" in log
    _same_training(run, ref)


def test_kill_between_checkpoint_and_metrics_line_loses_no_metrics(train_ref, tmp_path):
    ref = train_ref()
    run = _train_copy(ref, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][:15])  # epoch 3's line torn by the kill
    assert eval_searched_arch.main(TRAIN_TINY + ["--save_dir", str(run)]) == 0
    _same_bytes(run, ref, "metrics.jsonl")
    _same_training(run, ref)


# --------------------------------------------------------------------------------------------------
# 5. numerical robustness and determinism on the kernel path (in-process, reduced candidate set)

KERNEL_TINY = ["--dataset", "MetaMiniImageNet", "--ntk_type", "MetaNTK_anl", "--ntk_channels", "4", "--ntk_layers",
               "2", "--image_size", "8", "--batch_size", "2", "--n_ways", "2", "--repeat", "1", "--prune_number", "1",
               "--lr_batch_size", "50", "--lr_batches", "1", "--device", "cpu", "--rand_seed", "3"]


@pytest.fixture
def two_ops(monkeypatch):
    """Start the search with two ops per edge (skip_connect, sep_conv_3x3): one op round and the edge round."""
    ops = space_ops("darts_fewshot")

    def initial_alive(self):
        alive = np.zeros((2, len(self.keys), len(self.ops)), dtype=bool)
        alive[:, :, [ops.index("skip_connect"), ops.index("sep_conv_3x3")]] = True
        return alive

    monkeypatch.setattr(pruning.PruningSearch, "initial_alive", initial_alive)


def _kernel_search(data, save_dir, *extra) -> Path:
    assert prune_metantknas.main([*KERNEL_TINY, D, str(data), "--save_dir", str(save_dir), *extra]) == 0
    return save_dir


def _history(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "history.jsonl").read_text().splitlines()]


def test_kernel_search_is_deterministic(synthetic_mini, two_ops, tmp_path):
    a = _kernel_search(synthetic_mini, tmp_path / "a")
    b = _kernel_search(synthetic_mini, tmp_path / "b")
    _same_bytes(a, b, "genotype.json", "history.jsonl")
    kappas = [k for rec in _history(a) for c in rec["candidates"] for k in c["kappa"]]
    assert kappas and all(k is not None and np.isfinite(k) for k in kappas)


def test_nan_inf_and_singular_kernels_use_the_sentinel(synthetic_mini, two_ops, monkeypatch, tmp_path):
    calls = {"n": 0}
    real_gram, real_metantk = scoring.gram_by_group, scoring.analytical_metantk

    def gram(*a, **k):  # every third kernel has NaN / Inf entries
        calls["n"] += 1
        grams = real_gram(*a, **k)
        if calls["n"] % 3 == 0:
            grams = {name: torch.full_like(g, float("nan") if calls["n"] % 2 else float("inf"))
                     for name, g in grams.items()}
        return grams

    def metantk(*a, **k):  # and every fourth MetaNTK solve fails as on a singular kernel
        if calls["n"] % 4 == 0:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_metantk(*a, **k)

    monkeypatch.setattr(scoring, "gram_by_group", gram)
    monkeypatch.setattr(scoring, "analytical_metantk", metantk)
    run = _kernel_search(synthetic_mini, tmp_path / "run", "--candidates_per_pass", "1")  # the one-by-one path
    history = _history(run)
    events = sum(rec["sentinel_events"] for rec in history)
    sentinel_kappas = sum(k == pruning.KAPPA_SENTINEL for rec in history for c in rec["candidates"]
                          for k in c["kappa"]) + sum(k == pruning.KAPPA_SENTINEL for rec in history
                                                     for k in rec["kappa_full"])
    assert events > 0 and events == sentinel_kappas
    log = (run / "search.log").read_text()
    assert "singular or non-finite kernel (repeat 0 without normal " in log or \
           "singular or non-finite kernel (repeat 0 without reduce " in log
    assert f"{history[0]['sentinel_events']} singular kernels" in log
    assert json.loads((run / "genotype.json").read_text())["string"].startswith("Genotype(")


def test_identical_scores_everywhere_do_not_crash(synthetic_mini, two_ops, monkeypatch, tmp_path):
    monkeypatch.setattr(scoring, "condition_number", lambda *a, **k: 7.0)
    monkeypatch.setattr(scoring.CandidateScorer, "regions", lambda self, alive: 11)
    run = _kernel_search(synthetic_mini, tmp_path / "run", "--candidates_per_pass", "1")
    history = _history(run)
    assert all(rec["all_tied"] for rec in history) and all(rec["sentinel_events"] == 0 for rec in history)
    log = (run / "search.log").read_text()
    assert "every candidate has the same score" in log and "all scores tied" in log
    assert (run / "done").exists()


# --------------------------------------------------------------------------------------------------
# 6. run-directory rules: the -1 seed is recorded and reused, finished runs, --overwrite (patched search)


@pytest.fixture
def fake_search(monkeypatch):
    """Replace the scoring loop by a stub that records the seed it was given."""
    seeds = []

    def run(self, state=None):
        seeds.append(self.cfg.rand_seed)
        return PRESETS["mini-5cell-1"]

    monkeypatch.setattr(pruning.PruningSearch, "run", run)
    return seeds


def test_random_seed_is_recorded_printed_and_reused(synthetic_mini, fake_search, capsys, tmp_path):
    run = tmp_path / "run"
    argv = [*SEARCH_FAST, D, str(synthetic_mini), "--save_dir", str(run), "--rand_seed", "-1"]
    assert prune_metantknas.main(argv) == 0
    seed = json.loads((run / "config.json").read_text())["rand_seed"]
    assert seed >= 0 and fake_search == [seed]
    assert f"seed {seed} (drawn for --rand_seed -1" in capsys.readouterr().err
    assert json.loads((run / "genotype.json").read_text())["rand_seed"] == seed
    (run / "done").unlink()  # as if killed before the end: the resumed run reuses the recorded seed
    assert prune_metantknas.main(argv) == 0
    assert fake_search == [seed, seed]
    assert json.loads((run / "config.json").read_text())["rand_seed"] == seed


def test_finished_search_is_reported_and_overwrite_recomputes(synthetic_mini, fake_search, capsys, tmp_path):
    run = tmp_path / "run"
    argv = [*SEARCH_FAST, D, str(synthetic_mini), "--save_dir", str(run)]
    assert prune_metantknas.main(argv) == 0 and len(fake_search) == 1
    before = _snapshot(run)
    capsys.readouterr()
    assert prune_metantknas.main(argv) == 0
    assert "already finished" in capsys.readouterr().out and len(fake_search) == 1
    assert _snapshot(run) == before
    assert prune_metantknas.main(argv + ["--overwrite"]) == 0 and len(fake_search) == 2
