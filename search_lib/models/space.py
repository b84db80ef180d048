"""A search space resolved once: its operations (in column order) and the cell topology.

Cell topology (docs/method.md §1): states 0 and 1 are the cell inputs, intermediate nodes are
2..steps+1, and node i receives one edge from every earlier state j, named "i<-j"; the edges into one
node form an edge group (used by the final two-inputs-per-node pruning).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from search_lib.core.errors import UsageError
from search_lib.models.ops import space_ops


def edge_keys(steps: int) -> list[str]:
    """Edge names of a cell with `steps` intermediate nodes, in architecture-parameter row order.

    Node i (states 0 and 1 are the cell inputs, intermediate nodes are 2..steps+1) receives one edge
    from every earlier state j, named "i<-j"; 9 edges for 3 nodes, 14 for 4.
    """
    return [f"{i}<-{j}" for i in range(2, steps + 2) for j in range(i)]


def edge_groups(steps: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of the edges entering each node: (0,2), (2,5), (5,9) for 3 nodes."""
    groups, start = [], 0
    for i in range(2, steps + 2):
        groups.append((start, start + i))
        start += i
    return groups


def parse_edge_key(key: str) -> tuple[int, int]:
    node, src = key.split("<-")
    return int(node), int(src)


MAX_NODES_CHOICES = (3, 4)


@dataclass(frozen=True)
class SearchSpace:
    """A resolved search space: its name, intermediate nodes per cell, its ops (in column order) and edges."""

    name: str
    max_nodes: int = 3

    @classmethod
    def resolve(cls, name: str | SearchSpace, max_nodes: int = 3) -> SearchSpace:
        """UsageError for an unknown space or an unsupported node count; a SearchSpace is returned as it is."""
        if isinstance(name, SearchSpace):
            return name
        space_ops(name)  # raises on unknown names, listing the valid ones
        if max_nodes not in MAX_NODES_CHOICES:
            raise UsageError(f"--max_nodes {max_nodes} is not supported; use 3 (the paper) or 4")
        return cls(name, int(max_nodes))

    @cached_property
    def ops(self) -> tuple[str, ...]:
        return space_ops(self.name)

    @cached_property
    def keys(self) -> list[str]:
        return edge_keys(self.max_nodes)

    @cached_property
    def groups(self) -> list[tuple[int, int]]:
        return edge_groups(self.max_nodes)


# The paper's space: the DARTS few-shot operations, three intermediate nodes per cell.
DEFAULT_SPACE = SearchSpace("darts_fewshot", 3)
