"""Genotypes: the discrete cell architectures a search produces and the evaluation network consumes.

This module owns the `Genotype` value type (the cell topology it is read against, edge keys "i<-j" and
edge groups, is `search_lib.models.space`'s), its paper-style string form (parsed safely with `ast`, never
`eval`), its JSON form, the format of a search's ``genotype.json`` (`GenotypeRecord`), validation against a search space, the twelve
published genotypes (`PRESETS`), derivation from pruned architecture parameters and seeded random
genotypes (the random-architecture baseline). The cell layout is described in docs/method.md §1.
"""

from __future__ import annotations

import ast
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from search_lib.core.errors import GenotypeError, UsageError
from search_lib.core.utils import atomic_write_json
from search_lib.models.ops import SEARCH_SPACES
from search_lib.models.space import DEFAULT_SPACE, SearchSpace, parse_edge_key

# A pruned operation's architecture parameter; softmax turns it into a weight of ~0, below the
# supernet's 0.01 threshold, so the op is skipped in forward.
PRUNED_ALPHA = -1000.0

Node = tuple[tuple[str, int], ...]  # the (op, input state index) pairs feeding one intermediate node


# --------------------------------------------------------------------------------------------------
# The value type


@dataclass(frozen=True)
class Genotype:
    normal: tuple[Node, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Node, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self):
        # Normalise lists (from JSON or literals) to hashable tuples.
        for name in ("normal", "reduce"):
            nodes = tuple(tuple((str(op), int(idx)) for op, idx in node) for node in getattr(self, name))
            object.__setattr__(self, name, nodes)
        for name in ("normal_concat", "reduce_concat"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))

    # ---- string form (as printed by the paper's code) ----
    def __str__(self) -> str:
        def nodes(ns: Sequence[Node]) -> str:
            return "[" + ", ".join("[" + ", ".join(f"({op!r}, {i})" for op, i in n) + "]" for n in ns) + "]"

        return (f"Genotype(normal={nodes(self.normal)}, normal_concat={list(self.normal_concat)}, "
                f"reduce={nodes(self.reduce)}, reduce_concat={list(self.reduce_concat)})")

    @classmethod
    def parse(cls, text: str) -> Genotype:
        """Parse ``Genotype(normal=[...], normal_concat=[...], reduce=[...], reduce_concat=[...])``.

        Accepts the paper's nested form (a list of input pairs per node) and the DARTS flat form (a
        flat list of pairs, two per node), and ``range(a, b)`` for the concat lists. Only literals are
        evaluated (``ast.literal_eval``); anything else is refused.
        """
        text = text.strip()
        try:
            tree = ast.parse(text, mode="eval").body
        except SyntaxError as exc:
            raise GenotypeError(f"malformed genotype string (syntax error at column {exc.offset}): "
                                f"{_clip(text)}; expected Genotype(normal=[...], normal_concat=[...], "
                                "reduce=[...], reduce_concat=[...])") from None
        if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "Genotype"):
            raise GenotypeError(f"a genotype string must be a Genotype(...) call: {_clip(text)}")
        fields = ["normal", "normal_concat", "reduce", "reduce_concat"]
        values: dict[str, object] = {}
        if len(tree.args) > len(fields):
            raise GenotypeError(f"too many positional fields in genotype string: {_clip(text)}")
        for name, node in zip(fields, tree.args):
            values[name] = _literal(node, name)
        for kw in tree.keywords:
            if kw.arg not in fields:
                raise GenotypeError(f"unknown genotype field {kw.arg!r}; valid: {', '.join(fields)}")
            values[kw.arg] = _literal(kw.value, kw.arg)
        missing = [f for f in fields if f not in values]
        if missing:
            raise GenotypeError(f"genotype string lacks field(s) {', '.join(missing)}: {_clip(text)}")
        return cls.from_dict(values)

    # ---- JSON form ----
    def to_dict(self) -> dict:
        return {
            "normal": [[[op, i] for op, i in node] for node in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[[op, i] for op, i in node] for node in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> Genotype:
        """The genotype of its JSON form, or of a search's genotype.json record (see `GenotypeRecord`)."""
        if GenotypeRecord.is_record(data):
            return GenotypeRecord.from_dict(data).genotype
        try:
            return cls(
                normal=_nodes(data["normal"], "normal"),
                normal_concat=_concat(data["normal_concat"], "normal_concat"),
                reduce=_nodes(data["reduce"], "reduce"),
                reduce_concat=_concat(data["reduce_concat"], "reduce_concat"),
            )
        except KeyError as exc:
            raise GenotypeError(f"genotype lacks field {exc.args[0]!r}; expected normal, normal_concat, "
                                "reduce, reduce_concat") from None

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        return cls.from_dict(_json_object(text))

    # ---- validation ----
    @property
    def steps(self) -> int:
        return len(self.normal)

    def validate(self, space: SearchSpace | None) -> Genotype:
        """Check ops and node count against `space` (any space's ops and any node count when None), and the
        inputs; return self."""
        valid_ops = set(space.ops) if space else set().union(*SEARCH_SPACES.values())
        valid_ops.discard("none")
        for cell in ("normal", "reduce"):
            nodes = getattr(self, cell)
            if space is not None and len(nodes) != space.max_nodes:
                raise GenotypeError(f"genotype {cell} cell has {len(nodes)} nodes but the network needs "
                                    f"{space.max_nodes} (--max_nodes)")
            if not nodes:
                raise GenotypeError(f"genotype {cell} cell has no nodes")
            for k, node in enumerate(nodes):
                if len(node) != 2:
                    raise GenotypeError(f"genotype {cell} node {k} has {len(node)} inputs; every node needs 2")
                for op, idx in node:
                    if op not in valid_ops:
                        where = f"space {space.name!r}" if space else "any search space"
                        raise GenotypeError(f"genotype {cell} node {k}: unknown operation {op!r} for {where}; "
                                            f"valid: {', '.join(sorted(valid_ops))}")
                    if not 0 <= idx < k + 2:
                        raise GenotypeError(f"genotype {cell} node {k}: input index {idx} out of range "
                                            f"0..{k + 1}")
            concat = getattr(self, cell + "_concat")
            if not concat or any(not 0 <= i < len(nodes) + 2 for i in concat):
                raise GenotypeError(f"genotype {cell}_concat {list(concat)} refers to states outside "
                                    f"0..{len(nodes) + 1}")
        if len(self.normal) != len(self.reduce):
            raise GenotypeError(f"genotype normal cell has {len(self.normal)} nodes, reduce cell "
                                f"{len(self.reduce)}; they must match")
        return self

    def space(self) -> str:
        """The first search space holding every op of this genotype; GenotypeError if none holds them all."""
        ops = {op for cell in (self.normal, self.reduce) for node in cell for op, _ in node}
        for name, names in SEARCH_SPACES.items():
            if ops <= set(names):
                return name
        spaces = "; ".join(f"{name}: {', '.join(op for op in names if op != 'none')}"
                           for name, names in SEARCH_SPACES.items())
        raise GenotypeError(f"genotype mixes operations of different search spaces ({', '.join(sorted(ops))}); "
                            f"use the operations of one space ({spaces})")


def _json_object(text: str) -> dict:
    """A JSON object from text; GenotypeError (one line) when the text is not JSON or not an object."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GenotypeError(f"genotype JSON is malformed ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise GenotypeError("genotype JSON must be an object with normal, normal_concat, reduce, reduce_concat")
    return data


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _literal(node: ast.AST, name: str):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
            and not node.keywords):
        return list(range(*[_literal(a, name) for a in node.args]))
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        raise GenotypeError(f"genotype field {name!r} must be a literal list, got {ast.unparse(node)[:60]!r}") from None


def _pair(item, cell: str) -> tuple[str, int]:
    if (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], int) and not isinstance(item[1], bool)):
        return item[0], item[1]
    raise GenotypeError(f"genotype {cell}: expected ('op_name', input_index), got {item!r}")


def _nodes(value, cell: str) -> tuple[Node, ...]:
    if not isinstance(value, (list, tuple)):
        raise GenotypeError(f"genotype {cell} must be a list of nodes, got {type(value).__name__}")
    items = list(value)
    # DARTS flat form: [('op', i), ('op', j), ...], two pairs per node.
    if items and all(isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str) for x in items):
        if len(items) % 2:
            raise GenotypeError(f"genotype {cell} in flat form needs two inputs per node, got {len(items)} pairs")
        items = [items[i:i + 2] for i in range(0, len(items), 2)]
    nodes = []
    for node in items:
        if not isinstance(node, (list, tuple)):
            raise GenotypeError(f"genotype {cell}: each node must be a list of input pairs, got {node!r}")
        nodes.append(tuple(_pair(p, cell) for p in node))
    return tuple(nodes)


def _concat(value, name: str) -> tuple[int, ...]:
    if isinstance(value, range):
        value = list(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise GenotypeError(f"genotype {name} must be a list of integers, got {value!r}")
    return tuple(value)


# --------------------------------------------------------------------------------------------------
# genotype.json: the one format of a search's result


@dataclass(frozen=True)
class GenotypeRecord:
    """A genotype with where it came from: the ``genotype.json`` a search writes.

    ``{"genotype": {...}, "string": "Genotype(...)", "search_space": ..., "max_nodes": ..., "rand_seed": ...}``.
    A bare genotype (JSON form, paper string, preset) is a record without space, nodes or seed.
    """

    genotype: Genotype
    space: SearchSpace | None = None
    rand_seed: int | None = None

    @staticmethod
    def is_record(data) -> bool:
        return isinstance(data, dict) and isinstance(data.get("genotype"), dict)

    def to_dict(self) -> dict:
        space = self.space
        return {"genotype": self.genotype.to_dict(), "string": str(self.genotype),
                "search_space": space and space.name, "max_nodes": space and space.max_nodes,
                "rand_seed": self.rand_seed}

    def write(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> GenotypeRecord:
        if not cls.is_record(data):
            return cls(Genotype.from_dict(data))
        genotype = Genotype.from_dict(data["genotype"])
        name, nodes, seed = data.get("search_space"), data.get("max_nodes"), data.get("rand_seed")
        space = None
        if isinstance(name, str):  # a record without its node count is read against the genotype's own
            try:
                space = SearchSpace.resolve(name, nodes if isinstance(nodes, int) else genotype.steps)
            except UsageError as exc:
                raise GenotypeError(f"genotype record: {exc}") from None
        return cls(genotype, space, seed if isinstance(seed, int) else None)

    @classmethod
    def from_json(cls, text: str) -> GenotypeRecord:
        return cls.from_dict(_json_object(text))

    def validated(self, space: SearchSpace | None = None) -> GenotypeRecord:
        """Check the genotype against the given space, else against the one the record names (any space for a
        bare genotype)."""
        self.genotype.validate(space or self.space)
        return self


# --------------------------------------------------------------------------------------------------
# Published genotypes (docs/method.md §5), searched at 48 channels.

_PRESET_STRINGS = {
    "mini-5cell-1": "Genotype(normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], [('conv_3x3', 0), ('sep_conv_3x3', 2)]], normal_concat=[2, 3, 4], reduce=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('conv_1x5_5x1', 1), ('dil_conv_3x3', 2)], [('dil_conv_3x3', 2), ('dil_conv_3x3', 3)]], reduce_concat=[2, 3, 4])",
    "mini-5cell-2": "Genotype(normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], [('conv_3x3', 2), ('sep_conv_3x3', 3)]], normal_concat=[2, 3, 4], reduce=[[('sep_conv_3x3', 0), ('dil_conv_3x3', 1)], [('conv_1x5_5x1', 1), ('sep_conv_3x3', 2)], [('sep_conv_3x3', 1), ('conv_1x5_5x1', 3)]], reduce_concat=[2, 3, 4])",
    "mini-5cell-3": "Genotype(normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 0), ('max_pool_3x3BN', 2)], [('dil_conv_3x3', 2), ('sep_conv_3x3', 3)]], normal_concat=[2, 3, 4], reduce=[[('dil_conv_3x3', 0), ('sep_conv_3x3', 1)], [('conv_3x3', 1), ('sep_conv_3x3', 2)], [('sep_conv_3x3', 2), ('sep_conv_3x3', 3)]], reduce_concat=[2, 3, 4])",
    "mini-8cell-1": "Genotype(normal=[[('sep_conv_3x3', 0), ('max_pool_3x3BN', 1)], [('conv_1x5_5x1', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 2), ('conv_3x3', 3)]], normal_concat=[2, 3, 4], reduce=[[('skip_connect', 0), ('sep_conv_3x3', 1)], [('conv_3x3', 1), ('sep_conv_3x3', 2)], [('dil_conv_3x3', 0), ('conv_1x5_5x1', 1)]], reduce_concat=[2, 3, 4])",
    "mini-8cell-2": "Genotype(normal=[[('conv_3x3', 0), ('sep_conv_3x3', 1)], [('conv_1x5_5x1', 0), ('conv_3x3', 1)], [('sep_conv_3x3', 0), ('dil_conv_3x3', 2)]], normal_concat=[2, 3, 4], reduce=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 0), ('sep_conv_3x3', 2)], [('sep_conv_3x3', 0), ('sep_conv_3x3', 2)]], reduce_concat=[2, 3, 4])",
    "mini-8cell-3": "Genotype(normal=[[('sep_conv_3x3', 0), ('conv_1x5_5x1', 1)], [('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('conv_3x3', 0), ('sep_conv_3x3', 1)]], normal_concat=[2, 3, 4], reduce=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('conv_1x5_5x1', 1), ('sep_conv_3x3', 2)], [('conv_3x3', 0), ('sep_conv_3x3', 3)]], reduce_concat=[2, 3, 4])",
    "tiered-5cell-1": "Genotype(normal=[[('conv_3x3', 0), ('dil_conv_3x3', 1)], [('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], [('sep_conv_3x3', 0), ('sep_conv_3x3', 3)]], normal_concat=[2, 3, 4], reduce=[[('skip_connect', 0), ('dil_conv_3x3', 1)], [('sep_conv_3x3', 0), ('conv_1x5_5x1', 2)], [('max_pool_3x3BN', 2), ('conv_1x5_5x1', 3)]], reduce_concat=[2, 3, 4])",
    "tiered-5cell-2": "Genotype(normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 1), ('max_pool_3x3BN', 2)], [('conv_3x3', 2), ('conv_3x3', 3)]], normal_concat=[2, 3, 4], reduce=[[('dil_conv_3x3', 0), ('conv_1x5_5x1', 1)], [('conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 2), ('sep_conv_3x3', 3)]], reduce_concat=[2, 3, 4])",
    "tiered-5cell-3": "Genotype(normal=[[('sep_conv_3x3', 0), ('conv_1x5_5x1', 1)], [('dil_conv_3x3', 0), ('sep_conv_3x3', 2)], [('sep_conv_3x3', 0), ('max_pool_3x3BN', 3)]], normal_concat=[2, 3, 4], reduce=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('conv_1x5_5x1', 0), ('conv_1x5_5x1', 2)], [('dil_conv_3x3', 1), ('sep_conv_3x3', 3)]], reduce_concat=[2, 3, 4])",
    "tiered-8cell-1": "Genotype(normal=[[('conv_1x5_5x1', 0), ('sep_conv_3x3', 1)], [('conv_1x5_5x1', 0), ('conv_1x5_5x1', 1)], [('sep_conv_3x3', 0), ('conv_1x5_5x1', 2)]], normal_concat=[2, 3, 4], reduce=[[('skip_connect', 0), ('conv_3x3', 1)], [('conv_3x3', 0), ('conv_1x5_5x1', 1)], [('sep_conv_3x3', 0), ('sep_conv_3x3', 3)]], reduce_concat=[2, 3, 4])",
    "tiered-8cell-2": "Genotype(normal=[[('conv_1x5_5x1', 0), ('dil_conv_3x3', 1)], [('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 0), ('conv_3x3', 2)]], normal_concat=[2, 3, 4], reduce=[[('conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], [('conv_3x3', 0), ('sep_conv_3x3', 1)]], reduce_concat=[2, 3, 4])",
    "tiered-8cell-3": "Genotype(normal=[[('conv_1x5_5x1', 0), ('conv_1x5_5x1', 1)], [('sep_conv_3x3', 0), ('conv_1x5_5x1', 2)], [('sep_conv_3x3', 2), ('sep_conv_3x3', 3)]], normal_concat=[2, 3, 4], reduce=[[('conv_3x3', 0), ('conv_3x3', 1)], [('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 1), ('conv_1x5_5x1', 3)]], reduce_concat=[2, 3, 4])",
}


PRESETS: dict[str, Genotype] = {name: Genotype.parse(text) for name, text in _PRESET_STRINGS.items()}


def resolve_genotype_record(spec: str, space: SearchSpace | None = None) -> GenotypeRecord:
    """A preset name, a paper-style string, inline JSON or a path to a JSON file (genotype.json), as a record.

    The genotype is validated against `space` when given, else against the space a search's genotype.json
    records (any space for a bare genotype).
    """
    spec = spec.strip()
    if spec in PRESETS:
        record = GenotypeRecord(PRESETS[spec])
    elif spec.startswith("Genotype(") or spec.startswith("Genotype ("):
        record = GenotypeRecord(Genotype.parse(spec))
    elif spec.startswith("{"):
        record = GenotypeRecord.from_json(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise GenotypeError(f"--genotype {_clip(spec)!r} is neither a preset name, a Genotype(...) string nor an "
                                f"existing genotype.json file; presets: {', '.join(PRESETS)}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise GenotypeError(f"cannot read genotype file {path}: {exc}") from None
        record = (GenotypeRecord(Genotype.parse(text)) if text.lstrip().startswith("Genotype")
                  else GenotypeRecord.from_json(text))
    return record.validated(space)


def resolve_genotype(spec: str, space: SearchSpace | None = None) -> Genotype:
    """A genotype from a preset name, a paper-style string, or a path to a JSON file (genotype.json)."""
    return resolve_genotype_record(spec, space).genotype


def random_genotype(space: SearchSpace = DEFAULT_SPACE, seed: int = 0) -> Genotype:
    """A seeded random genotype of the space: per node, two distinct inputs, each with a random op."""
    rng = random.Random(seed)
    ops = [op for op in space.ops if op != "none"]
    max_nodes = space.max_nodes

    def cell() -> list[list[tuple[str, int]]]:
        return [[(rng.choice(ops), j) for j in sorted(rng.sample(range(k + 2), 2))] for k in range(max_nodes)]

    concat = list(range(2, max_nodes + 2))
    return Genotype(normal=cell(), normal_concat=concat, reduce=cell(), reduce_concat=concat)


def genotype_from_alphas(alphas_normal: torch.Tensor, alphas_reduce: torch.Tensor, space: SearchSpace) -> Genotype:
    """The genotype of a fully pruned supernet: each node keeps the edges with a remaining op.

    Raises GenotypeError if an edge still has several ops or a node does not have exactly two inputs,
    i.e. if the pruning has not finished.
    """
    ops, keys, max_nodes = space.ops, space.keys, space.max_nodes

    def cell(alphas: torch.Tensor, name: str) -> list[list[tuple[str, int]]]:
        alive = (alphas > PRUNED_ALPHA / 2).cpu()
        nodes: list[list[tuple[str, int]]] = [[] for _ in range(max_nodes)]
        for row, key in enumerate(keys):
            node, src = parse_edge_key(key)
            kept = [ops[c] for c in range(len(ops)) if alive[row, c]]
            if len(kept) > 1:
                raise GenotypeError(f"{name} edge {key} still has {len(kept)} ops; pruning has not finished")
            if kept:
                nodes[node - 2].append((kept[0], src))
        return nodes

    concat = list(range(2, max_nodes + 2))
    return Genotype(normal=cell(alphas_normal, "normal"), normal_concat=concat,
                    reduce=cell(alphas_reduce, "reduce"), reduce_concat=concat).validate(space)


def alphas_from_genotype(geno: Genotype, space: SearchSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `genotype_from_alphas`: 0 for the genotype's ops, PRUNED_ALPHA elsewhere."""
    geno.validate(space)  # its ops and node count are the space's
    ops, keys = space.ops, {k: r for r, k in enumerate(space.keys)}

    def cell(nodes: Iterable[Node]) -> torch.Tensor:
        alphas = torch.full((len(keys), len(ops)), PRUNED_ALPHA)
        for k, node in enumerate(nodes):
            for op, src in node:
                alphas[keys[f"{k + 2}<-{src}"], ops.index(op)] = 0.0
        return alphas

    return cell(geno.normal), cell(geno.reduce)
