"""The sweep runner (eval_lib.commands.sweep, scripts/sweep.sh): several jobs on one machine, finished ones skipped,
failures reported, one log per job, a summary table and JSON, exit codes.

The jobs are tiny Python scripts (milliseconds each), so the whole file runs in seconds; the real entry
points are only named in --dry_run job lists. Concurrency is shown with a barrier, not with timings: each
job waits until the other one has started, so run one after the other they would both fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eval_lib.commands import sweep, sweep_jobs

REPO = Path(__file__).resolve().parents[1]

FAKE_JOB = r'''
import argparse, os, sys, time
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--save_dir", required=True)
p.add_argument("--mode", default="ok")
p.add_argument("--meet", required=True)
p.add_argument("--name", required=True)
a = p.parse_args()
meet = Path(a.meet)
meet.mkdir(exist_ok=True)
# the barrier: sign in (with the thread count the sweep gave), then wait for a second job to sign in
(meet / a.name).write_text(os.environ.get("OMP_NUM_THREADS", "unset"))
deadline = time.monotonic() + 60
while len(list(meet.iterdir())) < 2:
    if time.monotonic() > deadline:
        print("error: no other job started", file=sys.stderr)
        sys.exit(5)
    time.sleep(0.05)
print("working in", a.save_dir, flush=True)
if a.mode == "fail":
    print("error: boom (a fake data error)", file=sys.stderr)
    sys.exit(3)
Path(a.save_dir).mkdir(parents=True, exist_ok=True)
(Path(a.save_dir) / "done").write_text("")
'''


def _table_rows(out: str) -> dict[str, list[str]]:
    """The summary table's rows by job name (the table starts at its header line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["job", "status"])
    return {line.split()[0]: line.split() for line in lines[start + 1:] if line.strip() and
            not line.startswith("summary:")}


def test_three_jobs_two_at_once(tmp_path, capsys, monkeypatch):
    """--jobs 2, three jobs: one done already (never started), one failing (exit 3), one succeeding."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # so the sweep chooses the thread share
    script, root, meet = tmp_path / "fake_job.py", tmp_path / "runs", tmp_path / "meet"
    script.write_text(FAKE_JOB)
    (root / "skip").mkdir(parents=True)
    (root / "skip" / "done").write_text("")
    jobs_file = tmp_path / "jobs.txt"
    jobs_file.write_text(
        "# three fake jobs\n"
        f"python {script} --save_dir {root}/skip --meet {meet} --name skip   # finished already\n"
        "\n"
        f"python '{script}' --mode fail --save_dir \"{root}/fail\" --meet {meet} --name fail\n"
        f"python {script} --save_dir={root}/ok --meet {meet} --name 'ok'\n")
    code = sweep.main(["--jobs_file", str(jobs_file), "--gpus", "none", "--jobs", "2", "--save_root", str(root)])
    out, err = capsys.readouterr()
    assert code == 1
    # the failing and the succeeding job met at the barrier: they ran at the same time; the done one never ran
    assert sorted(p.name for p in meet.iterdir()) == ["fail", "ok"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert {(meet / n).read_text() for n in ("fail", "ok")} == {str(max(1, cores // 2))}
    assert (root / "ok" / "done").is_file() and not (root / "fail").exists()

    rows = _table_rows(out)
    assert rows["skip"][1:3] == ["skipped", "-"]
    assert rows["fail"][1:3] == ["failed", "3"]
    assert rows["ok"][1:3] == ["ok", "0"]
    log_dir = root / "sweep_logs"
    assert rows["fail"][-1] == str(log_dir / "fail.log")
    assert "[failed] fail" in out and "error: boom" in out  # the failure's own message is shown
    assert err.strip().splitlines() == ["error: 1 of 3 jobs failed (fail); see their logs, fix and run the same "
                                        "sweep again (finished jobs are skipped)"]

    assert "error: boom (a fake data error)" in (log_dir / "fail.log").read_text()
    assert f"working in {root}/ok" in (log_dir / "ok.log").read_text()
    assert not (log_dir / "skip.log").exists()
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["exit_code"] == 1 and summary["parallel"] == 2
    by_name = {r["job"]: r for r in summary["jobs"]}
    assert [r["job"] for r in summary["jobs"]] == ["skip", "fail", "ok"]  # the file's order
    assert (by_name["skip"]["status"], by_name["skip"]["exit_code"], by_name["skip"]["log"]) == ("skipped", None, None)
    assert (by_name["fail"]["status"], by_name["fail"]["exit_code"]) == ("failed", 3)
    assert (by_name["ok"]["status"], by_name["ok"]["exit_code"]) == ("ok", 0)
    assert by_name["ok"]["command"].startswith(sys.executable)  # `python` is the sweep's own interpreter
    assert by_name["ok"]["save_dir"] == f"{root}/ok" and by_name["ok"]["wall_s"] >= 0


def test_jobs_file_parsing(tmp_path):
    jobs_file = tmp_path / "jobs.txt"
    jobs_file.write_text("  # a comment\n\n"
                         "prune_launch.py --dataset mini --cells 5 --save_dir 'runs/with space'  # trailing\n"
                         "python -c 'print(\"a # b\")' --save_dir=runs/x\n"
                         "/bin/echo \"two words\" --train_after_search --save_dir runs/x\n")
    commands = sweep_jobs.read_jobs_file(str(jobs_file))
    assert commands == [["prune_launch.py", "--dataset", "mini", "--cells", "5", "--save_dir", "runs/with space"],
                        ["python", "-c", 'print("a # b")', "--save_dir=runs/x"],
                        ["/bin/echo", "two words", "--train_after_search", "--save_dir", "runs/x"]]
    jobs = sweep_jobs.make_jobs(commands)
    assert jobs[0].argv[:2] == [sys.executable, str(REPO / "prune_launch.py")]  # from any folder
    assert jobs[1].argv[0] == sys.executable and jobs[2].argv[0] == "/bin/echo"
    assert [j.name for j in jobs] == ["with_space", "x", "x-2"]  # from the save_dir, made unique and file-safe
    assert [str(j.save_dir) for j in jobs] == ["runs/with space", "runs/x", "runs/x"]
    assert [j.train_after for j in jobs] == [False, False, True]
    assert sweep_jobs.bool_flag(["--train_after_search", "false"], "train_after_search") is False
    assert sweep_jobs.bool_flag(["--train_after_search=true", "--no-train_after_search"], "train_after_search") is False


def test_the_project_scripts_folders_are_read_by_their_own_parsers():
    """Every spelling of a flag counts (RFS's --model_path), the launcher's default folder of a fixed seed too; a
    drawn seed has no folder before the run starts."""
    def folder(*argv):
        return sweep_jobs.job_folder(sweep_jobs.resolve(list(argv)))

    assert folder("eval_searched_arch.py", "--genotype", "mini-5cell-1", "--model_path", "runs/m") == \
        (Path("runs/m"), False)
    assert folder("prune_launch.py", "--dataset", "mini", "--cells", "5", "--seed", "3") == \
        (Path("runs/search/MetaMiniImageNet-5cell-seed3"), False)
    assert folder("prune_launch.py", "--dataset", "mini", "--ntk_layers", "8", "--seed", "-1",
                  "--train_after_search", "true") == (None, True)
    assert folder("python", "prune_metantknas.py", "--save_dir=r/s", "--train_after_search") == (Path("r/s"), True)
    assert folder("prune_metantknas.py", "--save_dir", "r/s", "--no_such_flag") == (None, False)  # runs, reports


def test_presets_times_seeds_dry_run(tmp_path, capsys):
    root = tmp_path / "runs"
    argv = ["--presets", "mini-5cell,tiered-8cell", "--seeds", "0,1", "--save_root", str(root), "--gpus", "none",
            "--dry_run", "--", "--data_path", "/data/x", "--train_after_search"]
    (root / "mini-5cell-seed1" / "train").mkdir(parents=True)
    (root / "mini-5cell-seed1" / "done").write_text("")  # the search is done, its training is not: run it
    (root / "tiered-8cell-seed0" / "train").mkdir(parents=True)
    for marker in ("done", "train/done"):
        (root / "tiered-8cell-seed0" / marker).write_text("")
    assert sweep.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["mini-5cell-seed0", "run"], ["mini-5cell-seed1", "run"],
                                                   ["tiered-8cell-seed0", "skip"], ["tiered-8cell-seed1", "run"]]
    launch = str(REPO / "prune_launch.py")
    assert lines[3].endswith(f"{sys.executable} {launch} --dataset tiered --cells 8 --rand_seed 1 --save_dir "
                             f"{root}/tiered-8cell-seed1 --data_path /data/x --train_after_search")
    assert not (root / "sweep_logs").exists()  # a dry run writes nothing

    assert sweep.main(["--presets", "all", "--seeds", "3", "--gpus", "none", "--dry_run"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["mini-5cell-seed3", "mini-8cell-seed3", "tiered-5cell-seed3", "tiered-8cell-seed3"]


@pytest.mark.parametrize("argv, words", [
    (["--presets", "mini-5cell,mini-6cell"], "unknown preset mini-6cell in --presets; valid: mini-5cell"),
    (["--jobs_file", "/nonexistent/jobs.txt"], "cannot read --jobs_file /nonexistent/jobs.txt"),
    (["--presets", "all", "--seeds", "0,x"], "--seeds takes comma-separated whole numbers"),
    (["--presets", "all", "--gpus", "none", "--jobs", "0"], "--jobs 0: give at least 1"),
    (["--presets", "all", "--gpus", "0"], "this machine shows 0 CUDA device(s)"),
    (["--presets", "all", "--jobs_file", "x"], "not allowed with argument"),
])
def test_usage_errors_are_one_line(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert sweep.main(argv + ["--dry_run"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1 and not out


def test_one_gpu_per_job(tmp_path, capsys, monkeypatch):
    """Each job gets its own GPU, named as the sweep's own CUDA_VISIBLE_DEVICES names it (no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    jobs_file = tmp_path / "jobs.txt"
    seen = "import os, sys; open(sys.argv[1], 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])"
    jobs_file.write_text("".join(f"python -c \"{seen}\" {tmp_path}/gpu{i}\n" for i in range(2)))
    assert sweep.main(["--jobs_file", str(jobs_file), "--log_dir", str(tmp_path / "logs")]) == 0
    assert sorted((tmp_path / f"gpu{i}").read_text() for i in range(2)) == ["3", "5"]
    summary = json.loads((tmp_path / "logs" / "summary.json").read_text())
    assert [r["job"] for r in summary["jobs"]] == ["job0", "job1"] and summary["parallel"] == 2
    assert "--jobs 3: give at most the 2 GPU(s)" in (sweep.main(["--presets", "all", "--jobs", "3"]) == 2 and
                                                     capsys.readouterr().err)


def test_script_dry_run_of_the_example_jobs_file():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "sweep.sh"), "--jobs_file", "scripts/sweep_jobs.example",
                           "--gpus", "none", "--dry_run"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == [
        "mini-5cell-seed0", "tiered-8cell-seed0", "train-mini-5cell-1", "train-random-3", "digits-seed0"]


def test_ctrl_c_interrupts_the_running_jobs(tmp_path):
    """SIGINT to the sweep: its jobs are interrupted (not left running), the summary says so, exit 130."""
    jobs_file = tmp_path / "jobs.txt"
    job = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120); "
           "open(sys.argv[1] + '.end', 'w')")
    jobs_file.write_text(f"python -c \"{job}\" {tmp_path}/pid --save_dir {tmp_path}/a\n"
                         f"python -c \"pass\" --save_dir {tmp_path}/b\n")  # never started: --jobs 1
    proc = subprocess.Popen([sys.executable, "-m", "search_lib.sweep", "--jobs_file", str(jobs_file), "--gpus",
                             "none", "--save_root", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted; run the same sweep again to resume"
    with pytest.raises(ProcessLookupError):  # the job is gone (reaped by the sweep), before its sleep ended
        os.kill(int((tmp_path / "pid").read_text()), 0)
    assert not (tmp_path / "pid.end").exists()
    summary = json.loads((tmp_path / "sweep_logs" / "summary.json").read_text())
    assert [(r["job"], r["status"]) for r in summary["jobs"]] == [("a", "interrupted"), ("b", "not run")]
    assert summary["exit_code"] == 130
