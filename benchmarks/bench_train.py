"""Speed of the evaluation pipeline: the training step and the few-shot test, measured in the same run.

    python -m benchmarks.bench_train [--device cuda] [--init_channels 8 --layers 5] [--episodes 100]

(a) images/s of the training step (forward, backward, SGD step) of the AugmentCNN of ``--genotype`` on
    batches of the digits training set already in memory (float32, and bf16 autocast with ``--amp bf16``);
(b) the few-shot test of the same network on ``--episodes`` digits episodes per shot (5-way, 15 queries,
    5 augmented support copies, LR), in seconds per 1,000 episodes: the default path (``fast_fused``:
    ``--inference fused``, BatchNorm folded into the convolutions, channels_last), the fast path with the
    network as it is (``fast``: each query's features once, batched classifiers), the fast features with the reference
    scikit-learn classifier (``sklearn``), and the per-episode pipeline of earlier versions (item by item,
    scikit-learn), which is the baseline the ratios are against;
(c) the peak memory (CUDA: allocated; CPU: the process's maximum resident set).
Absolute times depend on the machine and its load; compare the ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

from benchmarks.common import peak_memory_mb, sync
from eval_lib.fewshot.meta_test import FewShotSettings, meta_test
from eval_lib.train.epoch import train_step
from eval_lib.train.network import build_network
from search_lib.core.command_line import make_parser
from search_lib.core.threads import configure_threads
from search_lib.core.utils import resolve_device
from search_lib.data import EpisodeDataset, SupervisedDataset
from search_lib.models.genotypes import resolve_genotype_record

DEMO_GENOTYPE = "mini-5cell-1"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m benchmarks.bench_train", __doc__, raw_description=True)
    p.add_argument("--genotype", default=DEMO_GENOTYPE, help="preset name, Genotype(...) string or genotype.json")
    p.add_argument("--init_channels", type=int, default=8)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--train_steps", type=int, default=10, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--amp", choices=("bf16", "none"), default="none", help="also time the step under bf16 autocast")
    p.add_argument("--episodes", type=int, default=100, help="episodes per shot of the few-shot test")
    p.add_argument("--shots", default="1,5")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the per-episode scikit-learn pipeline of earlier versions")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: configure_threads)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return p


class _ItemByItem(torch.utils.data.Dataset):
    """An EpisodeDataset seen only through __getitem__: meta_test's per-episode path (earlier versions')."""

    def __init__(self, episodes):
        self.episodes = episodes
        self.n_shots, self.n_queries = episodes.n_shots, episodes.n_queries
        self.n_aug_support_samples = episodes.n_aug_support_samples

    def __len__(self):
        return len(self.episodes)

    def __getitem__(self, i):
        return self.episodes[i]


def train_step_rate(net: nn.Module, data: SupervisedDataset, device: torch.device, batch_size: int, steps: int,
                    amp_dtype) -> float:
    """Images per second of forward + backward + SGD step on in-memory batches."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(min(steps + 2, 8)):
        idx = torch.randint(len(data), (batch_size,), generator=gen).tolist()
        items = [data[i] for i in idx]
        batches.append((torch.stack([x for x, _, _ in items]).to(device),
                        torch.tensor([y for _, y, _ in items], device=device)))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    net.train()

    def step(i):
        x, y = batches[i % len(batches)]
        train_step(net, x, y, opt, crit, amp_dtype)

    for i in range(2):
        step(i)
    sync(device)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return steps * batch_size / (time.perf_counter() - t)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    threads = configure_threads(0, args.threads)
    genotype = resolve_genotype_record(args.genotype).genotype
    train = SupervisedDataset("Digits", None, partition="train", transform="A", train=True)
    torch.manual_seed(0)
    net = build_network(genotype, dict(C=args.init_channels, layers=args.layers, num_classes=train.num_classes,
                                       stem_multiplier=1, fsr=2, in_channels=3)).to(device)
    result = {"device": str(device), "threads": threads, "genotype": args.genotype,
              "init_channels": args.init_channels, "layers": args.layers, "batch_size": args.batch_size,
              "train_images_per_s_fp32": train_step_rate(copy.deepcopy(net), train, device, args.batch_size,
                                                         args.train_steps, None)}
    if args.amp == "bf16":
        result["train_images_per_s_bf16"] = train_step_rate(copy.deepcopy(net), train, device, args.batch_size,
                                                            args.train_steps, torch.bfloat16)
    shots = [int(s) for s in args.shots.split(",")]
    fused, eager, sklearn = (FewShotSettings(inference="fused"), FewShotSettings(), FewShotSettings(backend="sklearn"))
    variants = [("fast_fused", lambda ds: meta_test(net, ds, fused, device=device, progress=False)),
                ("fast", lambda ds: meta_test(net, ds, eager, device=device, progress=False)),
                ("fast_features_sklearn", lambda ds: meta_test(net, ds, sklearn, device=device, progress=False))]
    if args.baseline:
        variants.append(("per_episode_sklearn", lambda ds: meta_test(net, _ItemByItem(ds), sklearn, device=device,
                                                                     progress=False)))
    warm = EpisodeDataset("Digits", None, partition="test", n_ways=5, n_shots=1, n_queries=15,
                          n_aug_support_samples=5, n_test_runs=2, transform="A", seed=1)
    for _, run in variants:
        run(warm)  # warm-up: first calls, caches of the split
    fewshot: dict[str, dict] = {}
    for name, run in variants:
        seconds, means = 0.0, {}
        for s in shots:
            ds = EpisodeDataset("Digits", None, partition="test", n_ways=5, n_shots=s, n_queries=15,
                                n_aug_support_samples=5, n_test_runs=args.episodes, transform="A", seed=0)
            sync(device)
            t = time.perf_counter()
            res = run(ds)
            sync(device)
            seconds += time.perf_counter() - t
            means[str(s)] = res["mean"]
        fewshot[name] = {"s_per_1000_episodes": 1000.0 * seconds / (args.episodes * len(shots)),
                         "mean_accuracy": means}
    base = fewshot.get("per_episode_sklearn", fewshot["fast_features_sklearn"])["s_per_1000_episodes"]
    for v in fewshot.values():
        v["speedup"] = base / v["s_per_1000_episodes"]
    result.update(fewshot=fewshot, episodes_per_shot=args.episodes, shots=shots,
                  peak_memory_mb=peak_memory_mb(device))

    if args.json:
        print(json.dumps(result))
        return 0
    print(f"device {result['device']} ({threads} threads), {args.genotype} C={args.init_channels} "
          f"{args.layers} cells, digits 32x32")
    print(f"(a) training step, batch {args.batch_size}: {result['train_images_per_s_fp32']:8.0f} images/s float32"
          + (f", {result['train_images_per_s_bf16']:.0f} images/s bf16" if "train_images_per_s_bf16" in result
             else ""))
    print(f"(b) few-shot test, {args.episodes} episodes x shots {args.shots} (5-way, 15 queries, 5 support copies, "
          f"LR):")
    for name, v in fewshot.items():
        acc = ", ".join(f"{s}-shot {m:.2f}%" for s, m in v["mean_accuracy"].items())
        print(f"    {name:22s} {v['s_per_1000_episodes']:8.1f} s / 1000 episodes  x{v['speedup']:5.1f}   ({acc})")
    print(f"(c) peak memory {result['peak_memory_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
