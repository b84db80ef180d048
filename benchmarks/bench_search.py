"""Cost of the search's kernel computation against a plain forward + backward, measured in the same run.

    python -m benchmarks.bench_search --channels 16 --layers 5 --image_size 32 [--device cuda]

Times (a) one `empirical_ntk` of the GroupNorm supernet on the paper's 30-image search batch, (b) one
plain forward + backward of the same network and batch (the floor), (c) a pruning round's scoring on
the built-in digits data (MetaNTK, one repeat; `--round_candidates` candidates, extrapolated to the
full first round of 126). Prints the ratio (a)/(b), the round time per candidate and the peak memory.
Absolute times depend on the machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch

from search_lib.config import SearchConfig
from search_lib.data import load_split
from search_lib.kernels import empirical_ntk
from search_lib.pruning import CandidateScorer, PruningSearch, repeat_seed
from search_lib.supernet import Supernet, init_weights, replace_norm
from search_lib.utils import resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=30, help="images of the NTK batch (paper: 30)")
    p.add_argument("--iters", type=int, default=3, help="timed repetitions of (a) and (b) (median reported)")
    p.add_argument("--round_candidates", type=int, default=12, help="candidates timed in (c); 0 skips it")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, iters: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    net = replace_norm(Supernet(args.channels, args.layers, 64), "groupnorm16")
    init_weights(net, "fan_out", seed=0)
    alphas = torch.zeros_like(net.alphas_normal)
    alphas[:, 0] = -1000.0  # `none` removed, as at the start of the search
    net.set_alphas(alphas, alphas)
    net.to(device).train()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)

    def plain():
        net.zero_grad(set_to_none=True)
        net(x)[1].sum().backward()
        net.zero_grad(set_to_none=True)

    t_ntk = _median_time(lambda: empirical_ntk(net, x), args.iters, device)
    t_plain = _median_time(plain, args.iters, device)
    result = {"device": str(device), "channels": args.channels, "layers": args.layers,
              "image_size": args.image_size, "batch": args.batch, "ntk_s": t_ntk, "plain_fwd_bwd_s": t_plain,
              "ratio_ntk_over_plain": t_ntk / t_plain, "kernels_per_candidate": 1}

    if args.round_candidates > 0:
        cfg = SearchConfig(dataset="MetaDigits", ntk_channels=args.channels, ntk_layers=args.layers,
                           image_size=args.image_size, repeat=1, rand_seed=0, device=str(device))
        split = load_split(cfg.dataset, None, "train")
        scorer = CandidateScorer(cfg, split, device, len(split.class_ids))
        search = PruningSearch(cfg)
        alive = search.initial_alive()
        cands = search.op_candidates(alive)
        scorer.begin_repeat(repeat_seed(0, 0, 0))
        try:
            _sync(device)
            t = time.perf_counter()
            scorer.kappa(alive, "full")
            scorer.regions(alive)
            for cand in cands[: args.round_candidates]:
                scorer.kappa(cand.without(alive), "candidate")
                scorer.regions(cand.without(alive))
            _sync(device)
            elapsed = time.perf_counter() - t
        finally:
            scorer.end_repeat()
        per_cand = elapsed / (args.round_candidates + 1)
        result.update(round_s_per_candidate=per_cand, round0_candidates=len(cands),
                      round0_extrapolated_s=per_cand * (len(cands) + 1))
    result["peak_memory_mb"] = _peak_memory_mb(device)

    if args.json:
        print(json.dumps(result))
        return 0
    print(f"device {result['device']}, C={args.channels}, {args.layers} cells, {args.image_size}x{args.image_size}, "
          f"batch {args.batch}")
    print(f"(a) empirical_ntk            {t_ntk * 1e3:9.1f} ms")
    print(f"(b) plain forward+backward   {t_plain * 1e3:9.1f} ms")
    print(f"    ratio (a)/(b)            {t_ntk / t_plain:9.2f}x   (kernels per candidate: 1)")
    if "round_s_per_candidate" in result:
        print(f"(c) round time per candidate {result['round_s_per_candidate'] * 1e3:9.1f} ms  (MetaNTK + regions; "
              f"first round of {result['round0_candidates']} candidates ~ {result['round0_extrapolated_s']:.0f} s)")
    print(f"    peak memory              {result['peak_memory_mb']:9.0f} MiB "
          f"({'CUDA max allocated' if device.type == 'cuda' else 'CPU max RSS'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
