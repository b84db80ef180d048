"""Cost of scoring one candidate of the search against a plain forward + backward, measured in the same run.

    python -m benchmarks.bench_search [--channels 16,48] [--layers 5] [--image_size 32] [--device cuda] [--json]

For each channel count C, on the built-in digits data with the paper's search batch (MetaNTK of MAML,
3 tasks x 5-way x (1 support + 1 query) = 30 images), one repeat's weights and batch:
(a) plain forward + backward of the same GroupNorm supernet on the same 30 images (the floor);
(b) the search's default path: per candidate (κ and linear regions): the regions of 16 candidates per pass of
    the thin network, the kernels of as many per pass as the memory rule allows (one at C=16 on the CPU);
(c) the reference path: per candidate, one pass each (what the search did before).
Prints (b)/(a), (c)/(a), the candidates per pass, the peak memory, the GPU busy fraction on CUDA, and an
estimate of the whole paper search (3 repeats x 507 scorings). Absolute times depend on the machine;
compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from benchmarks.common import peak_memory_mb, sync
from search_lib.core.command_line import make_parser
from search_lib.core.utils import resolve_device
from search_lib.data import load_split
from search_lib.search.pruning import PruningSearch, repeat_seed
from search_lib.search.scoring import REGIONS_PER_PASS, CandidateScorer
from search_lib.search.search_config import SearchConfig

# Scorings of the paper's 5-cell search per repeat: op rounds of 126, 108, 90, 72, 54, 36 candidates,
# the edge round of 14, and the full network once per round (7 rounds).
PAPER_SCORINGS_PER_REPEAT = 126 + 108 + 90 + 72 + 54 + 36 + 14 + 7
PAPER_REPEATS = 3


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m benchmarks.bench_search", __doc__, raw_description=True)
    p.add_argument("--channels", default="16,48", help="comma-separated channel counts C")
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--iters", type=int, default=3, help="timed repetitions of (a) (median reported)")
    p.add_argument("--candidates", type=int, default=0,
                   help="candidates timed on the fast path (default: one full pass of each network)")
    p.add_argument("--reference_candidates", type=int, default=3, help="candidates timed on the reference path")
    p.add_argument("--candidates_per_pass", type=int, default=0, help="0: chosen from the memory, as the search")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return p


def _timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def _median_time(fn, iters: int, device: torch.device) -> float:
    fn()  # warm-up
    return float(np.median([_timed(fn, device) for _ in range(iters)]))


def _gpu_busy(fn, device: torch.device) -> float | None:
    """Fraction of the wall time the GPU spends in kernels while ``fn`` runs (CUDA only)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = _timed(fn, device)
    busy_us = sum(e.self_device_time_total for e in prof.key_averages())
    return busy_us / 1e6 / wall if wall > 0 else None


def bench_channels(C: int, args, device: torch.device) -> dict:
    cfg = SearchConfig(dataset="MetaDigits", ntk_channels=C, ntk_layers=args.layers, image_size=args.image_size,
                       batch_size=3, repeat=1, rand_seed=0, device=str(device),
                       candidates_per_pass=args.candidates_per_pass).validate()
    split = load_split(cfg.data, None, "train")
    scorer = CandidateScorer(cfg, split, device, len(split.class_ids))
    search = PruningSearch(cfg)
    alive = search.initial_alive()
    cands = [c.without(alive) for c in search.op_candidates(alive)]
    scorer.begin_repeat(repeat_seed(0, 0, 0))
    try:
        per_pass = scorer.candidates_per_pass()
        n_fast = min(len(cands), args.candidates or max(per_pass, REGIONS_PER_PASS))
        fast_archs = cands[:n_fast]
        search.score_archs(scorer, fast_archs[:1], ["warm-up"])  # first-call costs (allocator, Opacus) untimed
        scorer.measured()  # forget the warm-up's pass
        t_fast = _timed(lambda: search.score_archs(scorer, fast_archs, ["c"] * n_fast), device)
        per_pass = scorer.measured()["pass_size"]  # the largest pass the measured memory allowed
        one_pass = fast_archs[:per_pass]
        busy = _gpu_busy(lambda: (scorer.kappas_many(one_pass, ["c"] * len(one_pass)), scorer.regions_many(one_pass)),
                         device)
        n_ref = min(len(cands), args.reference_candidates)
        t_ref = sum(_timed(lambda a=a: (scorer.kappa(a, "c"), scorer.regions(a)), device)
                    for a in cands[:n_ref]) if n_ref else float("nan")
    finally:
        scorer.end_repeat()
        scorer.close()

    model, x = scorer.model, scorer._inputs

    def plain():
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out[-1] if isinstance(out, (tuple, list)) else out).sum().backward()
        model.zero_grad(set_to_none=True)

    scorer.supernet.set_alphas(*(torch.where(torch.as_tensor(alive), 0.0, -1000.0)[i] for i in (0, 1)))
    t_plain = _median_time(plain, args.iters, device)
    fast_per = t_fast / n_fast
    ref_per = t_ref / n_ref if n_ref else float("nan")
    return {"channels": C, "batch": int(x.shape[0]), "plain_fwd_bwd_s": t_plain, "fast_s_per_candidate": fast_per,
            "reference_s_per_candidate": ref_per, "fast_over_plain": fast_per / t_plain,
            "reference_over_plain": ref_per / t_plain, "speedup_over_reference": ref_per / fast_per,
            "candidates_per_pass": per_pass, "candidates_timed": n_fast, "gpu_busy_fraction": busy,
            "paper_search_estimate_s": fast_per * PAPER_SCORINGS_PER_REPEAT * PAPER_REPEATS,
            "peak_memory_mb": peak_memory_mb(device)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    channels = [int(c) for c in str(args.channels).split(",") if c.strip()]
    rows = []
    for C in channels:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows.append(bench_channels(C, args, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.json:
        print(json.dumps({"device": str(device), "device_name": name, "layers": args.layers,
                          "image_size": args.image_size, "results": rows}))
        return 0
    print(f"device {device} ({name}), {args.layers} cells, {args.image_size}x{args.image_size}, MetaNTK (MAML), "
          f"batch {rows[0]['batch'] if rows else '-'}")
    for r in rows:
        busy = "" if r["gpu_busy_fraction"] is None else f", GPU busy {100 * r['gpu_busy_fraction']:.0f}%"
        print(f"C={r['channels']}:")
        print(f"  (a) plain forward+backward      {r['plain_fwd_bwd_s'] * 1e3:9.1f} ms")
        print(f"  (b) fast path, per candidate    {r['fast_s_per_candidate'] * 1e3:9.1f} ms   "
              f"{r['fast_over_plain']:.2f}x (a)   ({r['candidates_per_pass']} per pass{busy})")
        print(f"  (c) reference, per candidate    {r['reference_s_per_candidate'] * 1e3:9.1f} ms   "
              f"{r['reference_over_plain']:.2f}x (a)   (fast path {r['speedup_over_reference']:.1f}x faster)")
        print(f"      paper search estimate       {r['paper_search_estimate_s']:9.0f} s    "
              f"(3 repeats x {PAPER_SCORINGS_PER_REPEAT} scorings)")
        print(f"      peak memory                 {r['peak_memory_mb']:9.0f} MiB "
              f"({'CUDA max allocated' if device.type == 'cuda' else 'CPU max RSS'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
