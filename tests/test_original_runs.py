"""The paper repository's command lines run, made tiny by appended flags: its mini 5-cell script (a search and
the training after it, with the original --aug_* names), the search command line its launcher builds, and
the training command line its search builds (RFS's flags)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import script_argv

import eval_searched_arch
import prune_launch
import prune_metantknas
from search_lib.models.genotypes import PRESETS, GenotypeRecord
from search_lib.models.space import DEFAULT_SPACE

# the search made tiny: 4 channels, 8 px, 2 tasks of 2 classes, one repeat, one op round, few crops
TINY_SEARCH = ["--ntk_channels", "4", "--image_size", "8", "--n_ways", "2", "--repeat", "1", "--prune_number", "6",
               "--regions_batches", "1", "--regions_batch_size", "50", "--device", "cpu"]
# the training and test made tiny (our flags: the original had none for the test)
TINY_TEST = ["--image_size", "16", "--n_shots", "1", "--n_queries", "3", "--n_test_runs", "2",
             "--n_aug_support_samples", "1", "--eval_splits", "test", "--num_workers", "0"]


def test_mini_5cell_script_made_tiny_searches_and_trains(synthetic_mini, tmp_path, capsys):
    run = tmp_path / "mini5"
    script, _ = script_argv("script_mini_5cell.sh", tmp_path)
    argv = [*script, "--data_path", str(synthetic_mini), "--save_dir", str(run),
            *TINY_SEARCH, "--dartsbs", "2",
            # the training after it, with the original's names ...
            "--aug_channels", "4", "--aug_epochs", "1", "--aug_batchsize", "16", "--aug_lr", "0.05",
            "--aug_lr_decay_epochs", "1", "--aug_dp", "0.1",
            # ... and ours for the test
            *[f"--aug_{a[2:]}" if a.startswith("--") else a for a in TINY_TEST]]
    assert prune_launch.main(argv) == 0
    out, err = capsys.readouterr()
    assert "--device=cpu" in out.splitlines()[0]  # --device cpu, given after the script's --gpu 0, wins
    assert "keeping your" in err and "--aug_init_channels 4 (preset: 4)" not in err
    record = GenotypeRecord.from_json((run / "genotype.json").read_text())
    search = json.loads((run / "config.json").read_text())
    assert (search["algorithm"], search["inner_lr_time"], search["ntk_layers"], search["batch_size"]) == \
        ("MAML", 1000.0, 5, 2)
    assert search["rand_seed"] >= 0 and record.rand_seed == search["rand_seed"]  # --seed -1: drawn, recorded
    results = json.loads((run / "train" / "results.json").read_text())
    train = json.loads((run / "train" / "config.json").read_text())
    assert (train["init_channels"], train["layers"], train["epochs"], train["batch_size"]) == (4, 5, 1, 16)
    assert (train["learning_rate"], train["lr_decay_epochs"], train["drop_path_prob"]) == (0.05, [1], 0.1)
    assert train["genotype_resolved"] == str(record.genotype) and "test" in results["fewshot"]


def test_the_search_command_line_of_the_original_launcher_runs(synthetic_mini, tmp_path, capsys):
    """The command prune_launch.py of the original built for prune_metantknas.py (its no-op flags included)."""
    run = tmp_path / "prune-darts_fewshot" / "MetaMiniImageNet"
    original = (f"--save_dir {run} --max_nodes 3 --dataset MetaMiniImageNet --data_path {synthetic_mini} "
                "--search_space_name darts_fewshot --super_type nasnet-super "
                "--arch_nas_dataset /NAS-Bench-201-v1_0-e61699.pth --track_running_stats 1 --workers 0 "
                "--rand_seed -1 --timestamp Dec-02-20_10-00-1701511200 --precision 3 --init kaiming_normal "
                "--repeat 3 --batch_size 3 --ntk_type MetaNTK_anl --algorithm MAML --inner_lr_time 1000.0 "
                "--reg_coef 0.001 --train_after_search false --ntk_channels 48 --ntk_layers 5 --only_lrs false "
                "--aug_dp 0.2 --aug_channels 48 --aug_layers 5 --aug_lr 0.02 --aug_batchsize 64 --aug_epochs 100 "
                "--aug_lr_decay_epochs 60,80").split()
    assert prune_metantknas.main([*original, *TINY_SEARCH, "--batch_size", "2", "--ntk_layers", "2"]) == 0
    err = capsys.readouterr().err
    for flag in ("--super_type nasnet-super", "--arch_nas_dataset", "--track_running_stats 1", "--workers 0",
                 "--timestamp"):
        assert f"{flag}" in err and err.count("no effect here") == 5
    GenotypeRecord.from_json((run / "genotype.json").read_text()).genotype.validate(DEFAULT_SPACE)
    config = json.loads((run / "config.json").read_text())
    assert config["original_flags"]["--workers"] == "0" and config["init"] == "kaiming_normal"
    assert config["rand_seed"] >= 0 and not (run / "train").exists()  # --train_after_search false


@pytest.fixture
def data_root(synthetic_mini, tmp_path):
    """RFS's layout: <data_root>/miniImageNet."""
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(synthetic_mini, root / "miniImageNet")
    return root


def test_the_training_command_line_of_the_original_search_runs(data_root, tmp_path, capsys):
    """The command prune_metantknas.py of the original built for eval_searched_arch.py (RFS's flags)."""
    save = tmp_path / "search"
    original = ["--model", "augmentcnn", "--dataset", "miniImageNet", "--data_root", str(data_root),
                "--init_channels", "48", "--layers", "5", "--aug_dp", "0.2", "--aug_stemm", "1", "--aug_fsr", "2",
                "--lr_decay_epochs", "60,80", "--epochs", "100", "--learning_rate", "0.02", "--seed", "-1",
                "--batch_size", "64", "--genotype", str(PRESETS["mini-5cell-1"]), "--tb_path", str(save / "logs"),
                "--model_path", str(save / "model")]
    tiny = ["--init_channels", "4", "--layers", "2", "--epochs", "1", "--batch_size", "16", "--lr_decay_epochs", "1",
            *TINY_TEST, "--device", "cpu", "--no-progress"]
    assert eval_searched_arch.main(original + tiny) == 0
    results = json.loads((save / "model" / "results.json").read_text())
    config = json.loads((save / "model" / "config.json").read_text())
    assert results["genotype"] == str(PRESETS["mini-5cell-1"]) and "test" in results["fewshot"]
    assert config["seed"] >= 0 and config["data_path"] == os.path.join(str(data_root), "miniImageNet")
    assert (config["drop_path_prob"], config["stem_multiplier"], config["fsr"]) == (0.2, 1, 2)
    err = capsys.readouterr().err
    assert f"drew seed {config['seed']}" in err
    # the same command again: the run folder resumes with the seed it drew (here: finished, so reported)
    assert eval_searched_arch.main(original + tiny) == 0
    out, err = capsys.readouterr()
    assert f"with its seed {config['seed']}" in err and "already finished" in out
