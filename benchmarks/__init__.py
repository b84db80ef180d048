"""The benchmarks (docs/benchmarks.md); importing the package bounds OpenMP's spinning before torch loads, as the
toolkit's own packages do (`search_lib.core.openmp_env`)."""

from search_lib.core.openmp_env import bound_spinning

bound_spinning()
