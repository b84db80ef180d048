# Quickstart:  make demo   (set up, then search + train + few-shot test on the built-in digits data)
#              make test   (set up, then the test suite; what CI runs)
#              make study  (set up, then do the proxies predict few-shot accuracy? 24 architectures on digits,
#                           each trained twice to measure the training's own noise)
#              make lint   (set up, then ruff: lint and import order, configured in pyproject.toml)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= runs/demo
STUDY_DIR ?= runs/proxy_study
# pytest-xdist workers of `make test`: the tests set torch to one thread each, so two workers keep two cores
# busy; --dist loadfile keeps a file's module-scoped runs on one worker.
TEST_WORKERS ?= 2

.PHONY: setup demo study lint test test-slow bench bench-train bench-transforms bench-shared bench-prepare gpu-check \
  clean-demo clean-study

setup: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

# A MetaNTK (MAML) search on a small supernet, then a short training of the found genotype and its
# 1-shot / 5-shot test on the novel digit classes. About 3 minutes on 2 CPU cores.
demo: $(STAMP)
	$(PY) prune_metantknas.py --dataset MetaDigits --save_dir $(DEMO_DIR) --rand_seed 0 \
	  --ntk_channels 4 --image_size 16 --batch_size 2 --repeat 1 --prune_number 2 --regions_batch_size 300 \
	  --train_after_search --aug_init_channels 8 --aug_layers 5 --aug_epochs 10 --aug_batch_size 64 \
	  --aug_learning_rate 0.05 --aug_lr_decay_epochs 7 --aug_drop_path_prob 0.1 \
	  --aug_n_test_runs 100 --aug_n_queries 15 --aug_num_workers 0

# Proxies at initialisation (κ of the MetaNTK of MAML and ANIL and of the NTK, linear regions, #params, MACs,
# the zero-cost proxies grad_norm ... MeCo, two combined rankings) of 24 seeded random genotypes against their
# few-shot accuracy after a short training (16x16 digits, 5 epochs, 100 test episodes per shot): Kendall τ,
# Spearman ρ, partial τ / ρ given #params, bootstrap intervals, cost per proxy; see docs/proxy_study.md.
# --train_seeds 2 trains every architecture twice (seeds 0 and one derived from it): the proxies are ranked
# against the mean of the two, and the seed-to-seed ceiling (τ of one training's accuracies against the
# other's) says how much ranking the training's noise leaves to find. Two trainings cost twice the training
# time, so 24 architectures instead of the 32 of one training each: about 4.5 s of proxies and 2 x 27 s of
# training and test per architecture on one core of a quiet machine (the one-training study's 17.1 CPU-min for
# 32): 7 min 42 s measured on 2 quiet cores (12-13 min estimated from an earlier, slower machine, where 32
# would pass 15 min); fewer epochs would make every
# accuracy noisier. The first training of each is that of the one-training study (same seed, same folder).
# Two shards of one thread each share the folder: both cores work without OpenMP threads waiting on each
# other, and the records do not depend on the machine (a training's numbers depend on its thread count).
# The last shard to finish writes the summary (the table: $(STUDY_DIR)/summary.txt). Re-running resumes.
STUDY_FLAGS = --dataset MetaDigits --save_dir $(STUDY_DIR) --n_archs 24 --train_seeds 2 --seed 0 \
  --ntk_channels 4 --image_size 16 --batch_size 2 --repeat 2 --regions_batch_size 300 \
  --aug_init_channels 8 --aug_layers 5 --aug_image_size 16 --aug_epochs 5 --aug_batch_size 64 \
  --aug_learning_rate 0.05 --aug_lr_decay_epochs 4 --aug_drop_path_prob 0.1 --aug_eval_splits test \
  --aug_n_test_runs 100 --aug_n_queries 15 --aug_n_aug_support_samples 1 --aug_num_workers 0

study: $(STAMP)
	mkdir -p $(dir $(STUDY_DIR))
	OMP_NUM_THREADS=1 $(PY) -m eval_lib.proxy_study $(STUDY_FLAGS) --shard 1/2 > $(STUDY_DIR).shard1.log 2>&1 & \
	  first=$$!; OMP_NUM_THREADS=1 $(PY) -m eval_lib.proxy_study $(STUDY_FLAGS) --shard 0/2; status=$$?; \
	  wait $$first || { echo "shard 1/2 failed: see $(STUDY_DIR).shard1.log"; exit 1; }; \
	  test $$status -eq 0 && cat $(STUDY_DIR)/summary.txt

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow

bench: $(STAMP)
	$(PY) -m benchmarks.bench_search --channels 16,48 --layers 5 --image_size 32

# Training step (images/s), few-shot test per 1,000 episodes (fast vs reference, same run), peak memory.
bench-train: $(STAMP)
	$(PY) -m benchmarks.bench_train --init_channels 8 --layers 5 --episodes 100 --amp bf16

# The batched image transforms (transform A, the search's TENAS) against PIL image by image, same run.
bench-transforms: $(STAMP)
	$(PY) -m benchmarks.bench_transforms

# two demo searches (and two training epochs) side by side against one alone: the search's thread tuner and the
# training's fixed count with OpenMP's bounded spinning (--modes compares others: docs/benchmarks.md)
bench-shared: $(STAMP)
	$(PY) -m benchmarks.bench_shared --what search,train

# On a CUDA machine: the -m gpu tests, the paper's search preset timed, a short training and its few-shot test,
# the demo search's genotype on the CPU and on the GPU; at most 9 minutes (docs/benchmarks.md). Not in `make test`.
GPU_CHECK_DIR ?= runs/gpu_check

gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check --out $(GPU_CHECK_DIR)

# python -m search_lib.data.prepare on synthetic sources of the real sizes: CIFAR-FS from 60,000 images, and
# miniImageNet from 6,400 photograph-like JPEGs (images/s, the estimates for the real mini and tiered); peak memory.
bench-prepare: $(STAMP)
	$(PY) -m benchmarks.bench_prepare

clean-demo:
	rm -rf $(DEMO_DIR)

clean-study:
	rm -rf $(STUDY_DIR) $(STUDY_DIR).shard1.log
