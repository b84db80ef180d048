"""``python -m search_lib.data.prepare``: the few-shot benchmarks made from their primary sources, in the files
of RFS's release that the search and the training read, and a check of any data folder.

    python -m search_lib.data.prepare --dataset CIFAR-FS --source data/cifar-100-python --out data/CIFAR-FS
    python -m search_lib.data.prepare --dataset FC100 --source data --download --out data/FC100
    python -m search_lib.data.prepare --dataset miniImageNet --source /imagenet/train --out data/miniImageNet
    python -m search_lib.data.prepare --dataset tieredImageNet --source /imagenet/train --out data/tieredImageNet
    python -m search_lib.data.prepare --check data/miniImageNet --dataset miniImageNet

The published split lists ship with the package (`search_lib.data.split_lists`; ``--splits DIR`` for others in
the same formats). Each output file is written class after class under a hidden ``.partial`` name and renamed
when complete (`search_lib.data.streamed_files`): a killed run leaves no half-written file under a final
name, and running the same command again resumes at the class it stopped in. The folder's ``prepare.json``
records the plan and, once done, the MD5 of every file; a folder holding another dataset or other settings
is refused without ``--overwrite``. The preparation ends with the folder check (`search_lib.data.folder_check`)
and prints its screen. Sources, splits, sizes and times: docs/data.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from tqdm.auto import tqdm

from search_lib.core.command_line import add_config_flags, flag, flag_fields, make_parser, note, run_cli
from search_lib.core.errors import DataError, RunFailure, UsageError
from search_lib.core.run_dir import FolderLock
from search_lib.core.threads import available_cpus
from search_lib.core.utils import atomic_write_bytes, atomic_write_json
from search_lib.data.benchmark_plan import MANIFEST, Plan, cifar_plan, mini_plan, tiered_plan
from search_lib.data.cifar_source import download_cifar100, read_cifar100
from search_lib.data.folder_check import check_folder, read_manifest
from search_lib.data.imagenet_images import ImageDecoder
from search_lib.data.names import CIFAR_KEYS, DATASET_NAMES, DatasetSpec, expected_files, resolve_dataset
from search_lib.data.split_lists import read_split_lists
from search_lib.data.streamed_files import StreamedFile, npz_layout, python2_pickle, rfs_pickle_layout

LOCK_NAME = ".prepare.lock"
_NEXT = {"cifarfs": "MetaCIFAR-FS", "fc100": "MetaFC100", "mini": "MetaMiniImageNet", "tiered": "MetaTieredImageNet"}


@dataclass
class PrepareConfig:
    """The command's settings (each field is a flag)."""

    dataset: str | None = field(default=None, metadata=flag(
        "CIFAR-FS, FC100, miniImageNet or tieredImageNet (any spelling the search takes, e.g. MetaMiniImageNet); "
        "required", type=str))
    source: str | None = field(default=None, metadata=flag(
        "CIFAR-FS / FC100: CIFAR-100's python version (the cifar-100-python folder, the folder holding it, or "
        "cifar-100-python.tar.gz; with --download the folder to download into); miniImageNet / tieredImageNet: "
        "ImageNet-1k's training folder (one sub-folder of JPEGs per synset)", type=str))
    out: str | None = field(default=None, metadata=flag("the folder to write (created if missing)", type=str))
    check: str | None = field(default=None, metadata=flag(
        "check this folder as --dataset instead of preparing one: files, keys, shapes, classes and images per "
        "split, labels, MD5s; exit 3 with one line on the first problem", type=str, metavar="DIR"))
    splits: str | None = field(default=None, metadata=flag(
        "a folder of train / val / test class lists in the format of the published ones (docs/data.md); "
        "unset: the published lists", type=str, metavar="DIR"))
    download: bool = field(default=False, metadata=flag(
        "CIFAR-FS / FC100: download CIFAR-100 into --source through torchvision (MD5 checked) unless it is there"))
    trainval: bool = field(default=True, metadata=flag(
        "also write the trainval file (base + validation classes) that --use_trainval trains on"))
    overwrite: bool = field(default=False, metadata=flag(
        "replace the data files of another dataset or other settings in --out (other files are kept)"))
    workers: int = field(default=0, metadata=flag("threads decoding JPEGs; 0: one per CPU"))
    progress: bool = field(default=True, metadata=flag("progress bars (on a terminal)"))

    def __post_init__(self) -> None:
        if not self.dataset:
            raise UsageError(f"give --dataset: one of {', '.join(n for n in DATASET_NAMES if 'Digits' not in n)}")
        if self.spec.key not in _NEXT:
            raise UsageError(f"{self.spec.display} is built in and needs no preparation; use --dataset CIFAR-FS, "
                             f"FC100, miniImageNet or tieredImageNet")
        if self.check is not None:
            given = [f"--{f}" for f in ("source", "out", "splits") if getattr(self, f) is not None]
            if given or self.download or self.overwrite:
                raise UsageError(f"--check reads a folder and writes nothing; drop {', '.join(given) or 'the rest'}")
            return
        if self.out is None or self.source is None:
            raise UsageError("give --source and --out (or --check DIR to check a folder)")
        if self.download and self.spec.key not in CIFAR_KEYS:
            raise UsageError("--download fetches CIFAR-100 only; ImageNet cannot be downloaded without an account: "
                             "give its training folder as --source")
        if self.workers < 0:
            raise UsageError(f"--workers must be 0 (one per CPU) or more, got {self.workers}")

    @property
    def spec(self) -> DatasetSpec:
        return resolve_dataset(self.dataset)


def build_parser():
    parser = make_parser(prog="python -m search_lib.data.prepare", raw_description=True, description=__doc__)
    add_config_flags(parser, flag_fields(PrepareConfig))
    return parser


def config_from_args(args) -> PrepareConfig:
    return PrepareConfig(**{f.name: getattr(args, f.name) for f in fields(PrepareConfig)})


def make_plan(cfg: PrepareConfig) -> Plan:
    """What to write, from the lists and the source (every missing synset or malformed part found here)."""
    spec, lists = cfg.spec, read_split_lists(cfg.spec, cfg.splits)
    source = Path(cfg.source).expanduser()
    if spec.key in CIFAR_KEYS:
        return cifar_plan(spec, lists, read_cifar100(download_cifar100(source) if cfg.download else source),
                          cfg.trainval)
    return (mini_plan if spec.key == "mini" else tiered_plan)(spec, lists, source, cfg.trainval)


def _known_files(plan: Plan) -> list[str]:
    """Every data file name of any benchmark, and this plan's: what --overwrite may delete."""
    names = {n for key in _NEXT for n in expected_files(key)} | {n for fp in plan.files for n in fp.names}
    return sorted(names)


def claim_out(out: Path, plan: Plan, overwrite: bool) -> FolderLock:
    """Lock --out and make sure it holds nothing but this plan's files (or, with overwrite, clear the rest)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFailure(f"cannot create --out {out}: {exc.strerror}; choose a writable folder") from exc
    lock = FolderLock(out, LOCK_NAME).hold("a preparation", fix="wait for it to end or choose another --out")
    try:
        _clear_out(out, plan, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


def _clear_out(out: Path, plan: Plan, overwrite: bool) -> None:
    """Nothing to do when --out is empty or holds this plan's (partial) files; else refuse, or with overwrite
    delete the data files of any benchmark, the record and the partial files (other files stay)."""
    try:
        record = read_manifest(out)
    except DataError:
        if not overwrite:
            raise
        record = None
    present = [n for n in _known_files(plan) if (out / n).exists()]
    if (record is not None and record.get("key") == plan.key()) or (record is None and not present):
        return
    if not overwrite:
        if record is not None:
            content = plan.content()
            what = ", ".join(k for k in content if record.get(k) != content[k])
            other = "" if record.get("dataset") != plan.spec.display else f" prepared with other settings ({what})"
            raise UsageError(f"--out {out} holds {record.get('dataset')}{other}; choose another --out or add "
                             f"--overwrite")
        raise UsageError(f"--out {out} holds {', '.join(present[:3])}{', ...' if len(present) > 3 else ''}, not "
                         f"written by this command; choose an empty folder or add --overwrite (it deletes them)")
    for name in _known_files(plan) + [MANIFEST]:
        for path in (out / name, out / f".{name}.partial", out / f".{name}.partial.json"):
            path.unlink(missing_ok=True)


def _streamed(out: Path, plan: Plan, fp, counts: dict[str, int]) -> StreamedFile:
    shape = (sum(counts[c] for c in fp.classes), plan.image_size, plan.image_size, 3)
    key = f"{plan.key()}:{fp.split}"
    if plan.spec.key == "tiered":
        prefix, crc_from, suffix = npz_layout(shape)
        return StreamedFile(out / fp.names[0], prefix, suffix, len(fp.classes), key, crc_from)
    prefix, suffix = rfs_pickle_layout(shape, fp.image_labels(counts), fp.extras)
    return StreamedFile(out / fp.names[0], prefix, suffix, len(fp.classes), key)


def write_files(out: Path, plan: Plan, workers: int, progress: bool) -> None:
    """Write (or finish) every file of the plan, decoding each class once for all the files that hold it."""
    counts = plan.counts
    targets = [(fp, _streamed(out, plan, fp, counts), {c: i for i, c in enumerate(fp.classes)}) for fp in plan.files]
    decoder = None
    try:
        for _, streamed, _ in targets:
            streamed.open()
        todo = [(u, [sf for _, sf, pos in targets if u.name in pos and sf.done <= pos[u.name]]) for u in plan.units]
        todo = [(unit, need) for unit, need in todo if need]
        with tqdm(total=sum(u.count for u, _ in todo), unit="img", desc=plan.spec.display, dynamic_ncols=True,
                  disable=None if progress else True) as bar:
            if plan.spec.key not in CIFAR_KEYS:
                decoder = ImageDecoder(plan.image_size, workers or available_cpus(), bar)
            pending = decoder.submit(todo[0][0].source) if decoder and todo else None
            for i, (unit, need) in enumerate(todo):
                images = decoder.result(pending) if decoder else unit.source
                if decoder is None:
                    bar.update(unit.count)
                if decoder and i + 1 < len(todo):
                    pending = decoder.submit(todo[i + 1][0].source)  # the next class decodes while this one is written
                for streamed in need:
                    streamed.add(images)
                    if streamed.done == streamed.units:
                        streamed.finish()
    finally:
        for _, streamed, _ in targets:
            streamed.close()
        if decoder is not None:
            decoder.close()
    if plan.spec.key == "tiered":
        for fp in plan.files:  # after its images: a labels file without images would look complete
            if not (out / fp.names[1]).is_file():
                atomic_write_bytes(out / fp.names[1], python2_pickle(fp.tiered_labels(counts)))


def prepare(cfg: PrepareConfig) -> int:
    spec, out = cfg.spec, Path(cfg.out).expanduser()
    plan = make_plan(cfg)
    lock = claim_out(out, plan, cfg.overwrite)
    if plan.source_verified is False:
        note(f"{plan.source} is not the CIFAR-100 release (its MD5 differs from the one torchvision checks): the "
             f"output is not the published {spec.display}")
    try:
        record = read_manifest(out)
        files = [n for fp in plan.files for n in fp.names]
        if record is not None and record.get("status") == "done" and all((out / n).is_file() for n in files):
            print(f"{spec.display} in {out} is prepared already; check it with python -m search_lib.data.prepare "
                  f"--check {out} --dataset {spec.display}")
            return 0
        atomic_write_json(out / MANIFEST, plan.manifest("in progress"))
        write_files(out, plan, cfg.workers, cfg.progress)
        report = check_folder(spec, out, manifest=plan.manifest("done"), progress=cfg.progress)
        atomic_write_json(out / MANIFEST, plan.manifest("done", {n: d for r in report.rows for n, d in r.md5.items()}))
    finally:
        lock.release()
    print(report.screen())
    print(f"next: python prune_metantknas.py --dataset {_NEXT[spec.key]} --data_path {out} --save_dir runs/search")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        cfg = config_from_args(build_parser().parse_args(argv))
        if cfg.check is not None:
            print(check_folder(cfg.spec, cfg.check, progress=cfg.progress).screen())
            return 0
        return prepare(cfg)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
