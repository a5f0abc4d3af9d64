"""``--round-to``: kept head and channel counts at multiples of N, highest scores kept."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

from minillm.model.adapters import adapter_for
from minillm.prune import main
from minillm.scoring.allocation import parse_round_to, round_to_multiples


@pytest.fixture
def gqa_groups():
    """Layer 0 of tiny llama-gqa: 8 query heads in 2 KV groups of 4, 96 channels."""
    model = make_tiny_model("llama-gqa")
    return adapter_for(model).groups(model, 0)


def test_rounding_up_restores_the_highest_scoring_removed_channels(gqa_groups):
    g = gqa_groups["channels"]
    score = torch.arange(96, dtype=torch.float32).flip(0)  # unit u scores 95 - u
    kept = torch.tensor([0, 1, 2, 3, 4, 90])  # 6 kept, one of them a low scorer
    out = round_to_multiples(
        [g], {(0, "channels"): score}, {(0, "channels"): kept}, {"channels": 4}
    )
    # 6 rounds to 8 (halves up): the 6 kept plus the two best removed, units 5 and 6
    assert out[(0, "channels")].tolist() == [0, 1, 2, 3, 4, 5, 6, 90]


def test_rounding_down_drops_the_lowest_scoring_kept_channels(gqa_groups):
    g = gqa_groups["channels"]
    score = torch.arange(96, dtype=torch.float32)  # unit u scores u
    kept = torch.tensor([3, 10, 50, 60, 70])
    out = round_to_multiples(
        [g], {(0, "channels"): score}, {(0, "channels"): kept}, {"channels": 4}
    )
    assert out[(0, "channels")].tolist() == [10, 50, 60, 70]


def test_never_below_one_multiple(gqa_groups):
    g = gqa_groups["channels"]
    score = torch.rand(96, generator=torch.Generator().manual_seed(0))
    out = round_to_multiples(
        [g], {(0, "channels"): score}, {(0, "channels"): torch.tensor([7])}, {"channels": 8}
    )
    others = [u for u in score.argsort(descending=True).tolist() if u != 7]
    assert out[(0, "channels")].tolist() == sorted([7, *others[:7]])


def test_gqa_query_heads_round_per_kv_group(gqa_groups):
    g = gqa_groups["heads"]  # units 0-3 read KV head 0, units 4-7 KV head 1
    score = torch.tensor([5.0, 1.0, 3.0, 9.0, 2.0, 8.0, 7.0, 4.0])
    kept = torch.tensor([0, 1, 3, 4, 5, 6])  # 3 per group
    out = round_to_multiples([g], {(0, "heads"): score}, {(0, "heads"): kept}, {"heads": 2})
    # 3 per group rounds to 4 (halves up): each group restores its removed head
    assert out[(0, "heads")].tolist() == list(range(8))
    out = round_to_multiples(
        [g], {(0, "heads"): score}, {(0, "heads"): torch.tensor([0, 1, 3, 5, 6, 7])}, {"heads": 4}
    )
    assert out[(0, "heads")].tolist() == list(range(8))
    out = round_to_multiples(
        [g], {(0, "heads"): score}, {(0, "heads"): torch.tensor([0, 3, 4, 5])}, {"heads": 1}
    )
    assert out[(0, "heads")].tolist() == [0, 3, 4, 5]


def test_kinds_not_asked_are_left_alone(gqa_groups):
    groups = [gqa_groups["heads"], gqa_groups["channels"]]
    keep = {(0, "heads"): torch.tensor([0, 4]), (0, "channels"): torch.tensor([1, 2, 3])}
    scores = {(0, "heads"): torch.rand(8), (0, "channels"): torch.rand(96)}
    out = round_to_multiples(groups, scores, keep, {"channels": 2})
    assert out[(0, "heads")].tolist() == [0, 4] and len(out[(0, "channels")]) == 4


def test_round_to_spec_parses_both_forms():
    assert parse_round_to("8") == {"heads": 8, "channels": 8}
    assert parse_round_to("channels=64") == {"channels": 64}
    assert parse_round_to("heads=1,channels=8") == {"heads": 1, "channels": 8}


@pytest.mark.parametrize("family", ["llama-gqa"])
def test_cli_round_to_keeps_multiples_in_every_pruned_layer(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    argv = [str(tiny_model_dir), "--criterion", "magnitude", "--ratio", "0.37"]
    argv += ["--layers", "0-2", "--round-to", "heads=2,channels=8", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert all(rec["channels"] % 8 == 0 and rec["channels"] < 96 for rec in layers)
    assert all(rec["heads"] % (2 * rec["kv_heads"]) == 0 for rec in layers)


@pytest.mark.parametrize("family", ["llama-gqa"])
@pytest.mark.parametrize(
    "spec, message",
    [
        ("0", "--round-to: '0' is not N"),
        ("rows=4", "--round-to: 'rows=4' is not N"),
        ("heads=8", "--round-to: heads=8 exceeds the 4 heads per KV group of layer 0"),
    ],
)
def test_bad_round_to_is_a_one_line_error(tiny_model_dir, tmp_path, capsys, spec, message):
    argv = [str(tiny_model_dir), "--criterion", "magnitude", "--layers", "0-2"]
    assert main([*argv, "--round-to", spec, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"python -m minillm.prune: error: {message}") and "\n" not in err
    assert not (tmp_path / "o").exists()
