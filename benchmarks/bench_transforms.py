"""Speed of the batched image transforms against PIL image by image, measured in the same run.

    python -m benchmarks.bench_transforms [--repeats 5] [--json]

For each case a stack of random uint8 images goes through ``transform_stack`` (the exact batched executor,
`search_lib.data.pil_batch`) and through the transform image by image (the reference), under the same seed;
the outputs are checked to be equal and the best of ``--repeats`` timings of each is reported, with the
ratio reference / batched. The cases: transform A on the few-shot test's support copies (84x84, the paper's,
and the demo's 32x32 digits), and the search's TENAS transform on its batches (miniImageNet's 84x84 resized
to 32, the demo's 32 to 16, images already 32x32) and on the linear regions' image pool (its test variant).
Absolute times depend on the machine and its load; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from search_lib.core.threads import configure_threads
from search_lib.data import build_transform
from search_lib.data.transforms import transform_stack

# name, transform, train, dataset, image size, raw image size, images per stack
CASES = (
    ("A support copies, mini 84", "A", True, "mini", None, 84, 125),
    ("A support copies, digits 32", "A", True, "digits", None, 32, 125),
    ("TENAS search batch, mini 84 -> 32", "TENAS", True, "mini", None, 84, 100),
    ("TENAS search batch, digits 32 -> 16", "TENAS", True, "digits", 16, 32, 20),
    ("TENAS search batch, 32 -> 32", "TENAS", True, "mini", 32, 32, 100),
    ("TENAS regions pool, mini 84 -> 32", "TENAS", False, "mini", None, 84, 1000),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timings of each path (the best is kept)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the stack sizes (e.g. 0.1 for a quick run)")
    p.add_argument("--threads", type=int, default=1, help="compute threads")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return p


def _best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure(case: tuple, repeats: int, scale: float) -> dict:
    name, transform, train, dataset, size, raw, n = case
    n = max(1, int(round(n * scale)))
    tf = build_transform(transform, train, size, dataset)
    images = np.random.default_rng(0).integers(0, 256, size=(n, raw, raw, 3), dtype=np.uint8)
    index = list(range(n))
    transform_stack(tf, images, index)  # the first call checks the batched path against PIL
    batched_s, fast = _best_time(lambda: transform_stack(tf, images, index), repeats)
    reference_s, ref = _best_time(lambda: torch.stack([tf(img) for img in images]), repeats)
    return {"case": name, "images": n, "batched_ms": 1e3 * batched_s, "per_image_ms": 1e3 * reference_s,
            "speedup": reference_s / batched_s, "equal": bool(torch.equal(fast, ref))}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_threads(0, args.threads)
    rows = [measure(case, max(1, args.repeats), args.scale) for case in CASES]
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "cases": rows}))
        return 0
    print(f"best of {args.repeats}, {torch.get_num_threads()} thread(s); batched = transform_stack, "
          f"per image = PIL image by image")
    for r in rows:
        print(f"  {r['case']:<38} {r['images']:>5} images  batched {r['batched_ms']:8.1f} ms  per image "
              f"{r['per_image_ms']:8.1f} ms  x {r['speedup']:4.1f}  {'equal' if r['equal'] else 'DIFFERENT'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
