"""Few-shot data, shared by the search and the evaluation.

* `names`: dataset names (`resolve_dataset` -> `DatasetSpec`), partitions and release file names.
* `files`: loaders of the RFS releases of miniImageNet, CIFAR-FS and FC100 (Python-2 pickles, read with a
  restricted unpickler) and tieredImageNet (``.npz`` images plus ``.pkl`` labels): the rules a data file must
  meet, and their messages, for the search, the training and the folder check alike.
* `digits`: ``Digits``, a small bundled demo dataset built from ``sklearn.datasets.load_digits`` (no download):
  10 digits x {upright, rotated 90 degrees} = 20 classes, split 10 base / 5 validation / 5 novel.
* `split_lists`: the published class splits of the four benchmarks (data files in ``splits/``).
* `prepare`: ``python -m search_lib.data.prepare``, the benchmarks from CIFAR-100 and ImageNet and ``--check``
  of any folder, with `benchmark_plan` (what a prepared folder holds), `cifar_source`, `imagenet_images`,
  `streamed_files` (resumable files written class by class) and `folder_check`; `synthetic_sources` writes fake
  sources for its tests and benchmark.
* `transforms`: the RFS transforms ``A``, ``B``, ``C``, ``D`` (on CIFAR-FS / FC100: RFS's 32 x 32 one) and the
  TE-NAS search transform ``TENAS`` (the
  torchvision pipelines: the one definition of every step), and ``transform_stack`` / ``apply_seeded``.
* `augment`: those pipelines read as step descriptions (crop and padding, jitter factors, flip,
  normalisation) and the two samplers of their random choices (``sample_exact``: torch's global generator in
  torchvision's order; ``sample_device``: a seeded generator per batch).
* `pil_batch`: the exact executor (a pipeline on a stack of images, bit-identical to PIL image by image).
* `tensor_augment`: the fast executor (float tensors on the CPU or a GPU; the training's ``--gpu_augment``).
* `episodes`: ``SupervisedDataset`` (pre-training), ``EpisodeDataset`` (RFS episodes) and the samplers of
  the kernel search, ``sample_meta_batch`` (MetaNTK) and ``sample_batch`` (plain NTK).

The names below are the package's public interface; import them from ``search_lib.data``.
"""

from search_lib.data.episodes import (
    EpisodeDataset,
    EpisodePlan,
    EpisodeSubset,
    SupervisedDataset,
    sample_batch,
    sample_meta_batch,
)
from search_lib.data.files import SplitData, clear_cache, load_split
from search_lib.data.names import (
    DATASET_NAMES,
    DEFAULT_IMAGE_SIZE,
    PARTITIONS,
    DatasetSpec,
    canonical_dataset,
    expected_files,
    is_episodic_name,
    resolve_dataset,
)
from search_lib.data.transforms import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_MEAN,
    CIFAR_STD,
    MINI_MEAN,
    MINI_STD,
    TRANSFORM_NAMES,
    build_transform,
)

__all__ = [
    "DATASET_NAMES", "DEFAULT_IMAGE_SIZE", "TRANSFORM_NAMES", "PARTITIONS", "MINI_MEAN", "MINI_STD", "CIFAR_MEAN",
    "CIFAR_STD", "CIFAR100_MEAN", "CIFAR100_STD", "DatasetSpec", "SplitData", "canonical_dataset", "resolve_dataset",
    "is_episodic_name", "expected_files", "load_split", "clear_cache", "build_transform", "SupervisedDataset",
    "EpisodeDataset", "EpisodePlan", "EpisodeSubset", "sample_meta_batch", "sample_batch",
]
