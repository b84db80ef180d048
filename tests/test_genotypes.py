"""Genotypes (search_lib/models/genotypes.py): strings, JSON, validation, presets, alphas round trip."""

from __future__ import annotations

import json

import pytest
import torch

from eval_lib.rfs_models.augment_cnn import AugmentCNN
from search_lib.core.errors import GenotypeError, UsageError
from search_lib.models.genotypes import (
    PRESETS,
    PRUNED_ALPHA,
    Genotype,
    alphas_from_genotype,
    genotype_from_alphas,
    random_genotype,
    resolve_genotype,
)
from search_lib.models.ops import space_ops
from search_lib.models.space import SearchSpace, edge_groups, edge_keys

DFS = SearchSpace("darts_fewshot", 3)
DARTS4 = SearchSpace("darts", 4)

# The published strings, copied verbatim (independent of the library's own copy).
REFERENCE_STRINGS = {
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

G1 = REFERENCE_STRINGS["mini-5cell-1"]


def make(normal, reduce=None, concat=(2, 3, 4)):
    return Genotype(normal=normal, normal_concat=list(concat), reduce=reduce if reduce is not None else normal,
                    reduce_concat=list(concat))


OK_NODES = [[("sep_conv_3x3", 0), ("sep_conv_3x3", 1)], [("conv_3x3", 0), ("dil_conv_3x3", 2)],
            [("skip_connect", 1), ("max_pool_3x3BN", 3)]]


# ---------------------------------------------------------------------------------------------------
# Edges


def test_edge_keys_and_groups():
    assert edge_keys(3) == ["2<-0", "2<-1", "3<-0", "3<-1", "3<-2", "4<-0", "4<-1", "4<-2", "4<-3"]
    assert len(edge_keys(4)) == 14 and edge_keys(4)[9:] == ["5<-0", "5<-1", "5<-2", "5<-3", "5<-4"]
    assert edge_groups(3) == [(0, 2), (2, 5), (5, 9)]
    assert edge_groups(4) == [(0, 2), (2, 5), (5, 9), (9, 14)]


# ---------------------------------------------------------------------------------------------------
# Strings and JSON


def test_exactly_the_twelve_reference_presets():
    assert set(PRESETS) == set(REFERENCE_STRINGS)


@pytest.mark.parametrize("name", sorted(REFERENCE_STRINGS))
def test_preset_parse_and_str_round_trip(name):
    text = REFERENCE_STRINGS[name]
    g = Genotype.parse(text)
    assert str(g) == text
    assert PRESETS[name] == g
    assert str(PRESETS[name]) == text
    g.validate(DFS)
    assert Genotype.from_json(g.to_json()) == g
    assert json.loads(g.to_json())["normal"][0][0] == list(g.normal[0][0])


def test_parsed_structure():
    g = Genotype.parse(G1)
    assert g.normal[2] == (("conv_3x3", 0), ("sep_conv_3x3", 2))
    assert g.reduce[1] == (("conv_1x5_5x1", 1), ("dil_conv_3x3", 2))
    assert g.normal_concat == (2, 3, 4) and g.reduce_concat == (2, 3, 4)
    assert g.steps == 3


def test_darts_flat_form_and_range_concat():
    flat = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2), "
            "('conv_3x3', 0), ('sep_conv_3x3', 2)], normal_concat=range(2, 5), "
            "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('conv_1x5_5x1', 1), ('dil_conv_3x3', 2), "
            "('dil_conv_3x3', 2), ('dil_conv_3x3', 3)], reduce_concat=range(2, 5))")
    g = Genotype.parse(flat)
    assert g == Genotype.parse(G1)
    assert str(g) == G1


def test_json_round_trip_and_search_output_form(tmp_path):
    g = random_genotype(DARTS4, seed=3)
    assert Genotype.from_json(g.to_json()) == g
    wrapped = json.dumps({"genotype": g.to_dict(), "string": str(g)})
    assert Genotype.from_json(wrapped) == g


@pytest.mark.parametrize("text", [
    "Genotype(normal=[[('sep_conv_3x3', 0)",  # truncated
    "normal=[[('sep_conv_3x3', 0)]]",
    "Genotype(normal=[], normal_concat=[2])",  # missing fields
    "Genotype(normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)]], normal_concat=[2], reduce=[[('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 1)]], reduce_concat=[2], extra=[1])",
    "Genotype(normal=[[('sep_conv_3x3', 'a'), ('sep_conv_3x3', 1)]], normal_concat=[2], "
    "reduce=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)]], reduce_concat=[2])",
    "Genotype(normal=[[(3, 0), ('sep_conv_3x3', 1)]], normal_concat=[2], "
    "reduce=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)]], reduce_concat=[2])",
    "NotGenotype(normal=[], normal_concat=[], reduce=[], reduce_concat=[])",
    "",
])
def test_malformed_strings_raise_genotype_error(text):
    with pytest.raises(GenotypeError):
        Genotype.parse(text)


def test_genotype_error_is_usage_error():
    assert issubclass(GenotypeError, UsageError)


def test_code_in_strings_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    cmd = f"__import__('os').system('touch {marker}')"
    for text in (cmd,
                 f"Genotype(normal={cmd}, normal_concat=[2], reduce=[], reduce_concat=[2])",
                 f"Genotype(normal=[], normal_concat=range({cmd}), reduce=[], reduce_concat=[2])"):
        with pytest.raises(GenotypeError):
            Genotype.parse(text)
        with pytest.raises(GenotypeError):
            resolve_genotype(text)
    assert not marker.exists()


def test_malformed_json_raises():
    with pytest.raises(GenotypeError):
        Genotype.from_json("{not json")
    with pytest.raises(GenotypeError):
        Genotype.from_json("[1, 2]")
    with pytest.raises(GenotypeError):
        Genotype.from_json(json.dumps({"normal": [], "normal_concat": [2]}))


# ---------------------------------------------------------------------------------------------------
# Validation


def test_validate_accepts_good_genotype():
    g = make(OK_NODES)
    assert g.validate(DFS) is g
    assert g.validate(None) is g


@pytest.mark.parametrize("geno,kwargs,match", [
    (make([[("sep_conv_7x7", 0), ("sep_conv_3x3", 1)]] + OK_NODES[1:]), {}, "unknown operation"),
    (make([[("none", 0), ("sep_conv_3x3", 1)]] + OK_NODES[1:]), {}, "unknown operation"),
    (make([[("sep_conv_3x3", 0), ("sep_conv_3x3", 2)]] + OK_NODES[1:]), {}, "out of range"),
    (make(OK_NODES[:2] + [[("sep_conv_3x3", 5), ("sep_conv_3x3", 1)]]), {}, "out of range"),
    (make([[("sep_conv_3x3", -1), ("sep_conv_3x3", 1)]] + OK_NODES[1:]), {}, "out of range"),
    (make(OK_NODES), {"max_nodes": 4}, "nodes"),
    (make(OK_NODES[:2], concat=(2, 3)), {}, "nodes"),
    (make([[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("conv_3x3", 1)]] + OK_NODES[1:]), {}, "3 inputs"),
    (make([[("sep_conv_3x3", 0)]] + OK_NODES[1:]), {}, "1 inputs"),
    (make(OK_NODES, concat=(2, 3, 7)), {}, "concat"),
    (make(OK_NODES, reduce=OK_NODES[:2]), {}, "reduce"),
])
def test_validate_rejects(geno, kwargs, match):
    with pytest.raises(GenotypeError, match=match):
        geno.validate(SearchSpace("darts_fewshot", kwargs.get("max_nodes", 3)))


def test_op_from_other_space_rejected_only_when_space_given():
    g = make([[("sep_conv_5x5", 0), ("sep_conv_3x3", 1)]] + OK_NODES[1:])  # sep_conv_5x5: darts only
    with pytest.raises(GenotypeError, match="sep_conv_5x5"):
        g.validate(DFS)
    g2 = make([[("sep_conv_3x3", 0), ("sep_conv_5x5", 1)], [("avg_pool_3x3", 0), ("dil_conv_5x5", 2)],
               [("skip_connect", 1), ("max_pool_3x3", 3)]])
    g2.validate(SearchSpace("darts", 3))
    g2.validate(None)
    with pytest.raises(GenotypeError, match="avg_pool_3x3"):
        g2.validate(DFS)
    with pytest.raises(GenotypeError):
        Genotype.parse(G1).validate(SearchSpace("darts", 3))  # conv_3x3 is not in the darts space


def test_an_unknown_space_is_usage_error():
    with pytest.raises(UsageError):
        SearchSpace.resolve("nonexistent", 3)


# ---------------------------------------------------------------------------------------------------
# resolve_genotype


def test_resolve_preset_string_and_path(tmp_path):
    assert resolve_genotype("tiered-8cell-2") == Genotype.parse(REFERENCE_STRINGS["tiered-8cell-2"])
    assert resolve_genotype("  " + G1 + "\n") == Genotype.parse(G1)
    g = random_genotype(DFS, seed=11)
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps({"genotype": g.to_dict(), "string": str(g)}))
    assert resolve_genotype(str(path), space=DFS) == g
    txt = tmp_path / "genotype.txt"
    txt.write_text(str(g) + "\n")
    assert resolve_genotype(str(txt)) == g


def test_resolve_bad_specs(tmp_path):
    with pytest.raises(GenotypeError, match="preset"):
        resolve_genotype("mini-5cell-9")
    with pytest.raises(GenotypeError):
        resolve_genotype(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{broken")
    with pytest.raises(GenotypeError):
        resolve_genotype(str(bad))
    with pytest.raises(GenotypeError):  # valid preset, wrong node count for the network
        resolve_genotype("mini-5cell-1", space=SearchSpace("darts_fewshot", 4))
    with pytest.raises(GenotypeError):  # valid preset, wrong space
        resolve_genotype("mini-5cell-1", space=SearchSpace("darts", 3))


# ---------------------------------------------------------------------------------------------------
# Random genotypes


@pytest.mark.parametrize("space,max_nodes", [("darts_fewshot", 3), ("darts", 4)])
def test_random_genotype_seeded_and_valid(space, max_nodes):
    a = random_genotype(SearchSpace(space, max_nodes), seed=7)
    assert a == random_genotype(SearchSpace(space, max_nodes), seed=7)
    others = {random_genotype(SearchSpace(space, max_nodes), seed=s) for s in range(8, 14)}
    assert len(others | {a}) > 1 and any(o != a for o in others)
    for g in [a, *others]:
        g.validate(SearchSpace(space, max_nodes))
        for cell in (g.normal, g.reduce):
            assert len(cell) == max_nodes
            for node in cell:
                assert len(node) == 2 and node[0][1] != node[1][1]
                assert all(op != "none" for op, _ in node)
        assert g.normal_concat == tuple(range(2, max_nodes + 2))


def test_random_genotype_does_not_touch_global_rng():
    import random
    random.seed(123)
    expected = random.random()
    random.seed(123)
    random_genotype(seed=5)
    assert random.random() == expected


# ---------------------------------------------------------------------------------------------------
# Alphas round trip


@pytest.mark.parametrize("name", sorted(REFERENCE_STRINGS))
def test_alphas_round_trip_for_presets(name):
    g = PRESETS[name]
    an, ar = alphas_from_genotype(g, DFS)
    assert an.shape == ar.shape == (9, len(space_ops("darts_fewshot")))
    # exactly 2 alive entries per node, one per alive edge
    assert int((an > PRUNED_ALPHA / 2).sum()) == 6
    assert genotype_from_alphas(an, ar, DFS) == g


def test_alphas_round_trip_random_darts_4_nodes():
    for seed in range(5):
        g = random_genotype(DARTS4, seed=seed)
        an, ar = alphas_from_genotype(g, DARTS4)
        assert an.shape == (14, 8)
        assert genotype_from_alphas(an, ar, DARTS4) == g


def test_alphas_layout_matches_edge_keys():
    g = Genotype.parse(G1)
    an, _ = alphas_from_genotype(g, DFS)
    ops = space_ops("darts_fewshot")
    keys = edge_keys(3)
    alive = {(keys[r], ops[c]) for r, c in (an > PRUNED_ALPHA / 2).nonzero().tolist()}
    assert alive == {("2<-0", "sep_conv_3x3"), ("2<-1", "sep_conv_3x3"), ("3<-1", "sep_conv_3x3"),
                     ("3<-2", "sep_conv_3x3"), ("4<-0", "conv_3x3"), ("4<-2", "sep_conv_3x3")}


def test_unfinished_alphas_raise():
    an, ar = alphas_from_genotype(PRESETS["mini-5cell-1"], DFS)
    an2 = an.clone()
    an2[0, 3] = 0.0  # edge 2<-0 now has two ops
    with pytest.raises(GenotypeError, match="2<-0"):
        genotype_from_alphas(an2, ar, DFS)
    an3 = an.clone()
    an3[2, 1] = 0.0  # node 3 gets a third input edge (3<-0)
    with pytest.raises(GenotypeError, match="3 inputs"):
        genotype_from_alphas(an3, ar, DFS)
    with pytest.raises(GenotypeError):  # nothing pruned at all
        genotype_from_alphas(torch.zeros(9, 8), torch.zeros(9, 8), DFS)


# ---------------------------------------------------------------------------------------------------
# Every preset builds the evaluation network


@pytest.mark.parametrize("name", sorted(REFERENCE_STRINGS))
def test_presets_build_and_forward(name):
    layers = 5 if "5cell" in name else 8
    torch.manual_seed(0)
    net = AugmentCNN(PRESETS[name], C=8, layers=layers, num_classes=5)
    assert len(net.cells) == layers
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
