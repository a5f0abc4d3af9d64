"""benchmarks/bench_peers.py: its own logic without the peers' code (ratio matching, checkout
check, the run-time adaptations on tiny models), and the peers' code on a tiny model when
checkouts are named by ``MINILLM_FLAP_DIR`` / ``MINILLM_LLM_PRUNER_DIR`` (skipped otherwise)."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_lm import byte_tokenizer
from conftest import tiny_config
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_peers  # noqa: E402


def staircase(step_params: int, total: int, units: int):
    """Parameters left at ratio r when each removed unit (``units`` of them) costs
    ``step_params``; counts the calls."""
    calls = []

    def count(r: float) -> int:
        calls.append(r)
        return total - step_params * math.floor(r * units + 1e-12)

    return count, calls


def test_match_ratio_picks_the_closest_count():
    count, calls = staircase(1000, 100_000, 50)
    target = 80_300  # between 80,000 (20 units) and 81,000 (19 units): 20 units is closer
    r, c, tried = bench_peers.match_ratio(count, target, 0.1, slope=50_000, max_evals=30)
    assert c == 80_000 and math.floor(r * 50 + 1e-12) == 20
    assert len(tried) == len(set(calls)) <= 30
    assert all(abs(n - target) >= abs(c - target) for _, n in tried)


def test_match_ratio_stops_on_an_exact_hit_and_respects_the_budget():
    count, calls = staircase(1000, 100_000, 50)
    _, c, _ = bench_peers.match_ratio(count, 80_000, 0.4, slope=50_000, max_evals=30)
    assert c == 80_000 and count(calls[-1]) == 80_000  # nothing evaluated after the hit
    _, _, tried = bench_peers.match_ratio(count, 80_300, 0.9, slope=50_000, max_evals=2)
    assert len(tried) == 2


def test_match_ratio_across_a_jump():
    """A count with a large step (a whole attention group) keeps the closest side of it."""

    def count(r: float) -> int:
        return 100_000 - 1000 * math.floor(r * 50) - (30_000 if r > 1 / 3 else 0)

    _, c, _ = bench_peers.match_ratio(count, 66_000, 0.2, slope=50_000, max_evals=40)
    assert abs(c - 66_000) == min(abs(count(k / 5000) - 66_000) for k in range(5001))


def test_llm_pruner_attention_range_is_empty_below_one_kv_head():
    args = argparse.Namespace(
        layers="3-27", cache_dir="m", nsamples=64, llm_pruner_taylor="param_first"
    )

    def attention_range(ratio):
        argv = bench_peers.llm_pruner_argv(args, ratio, "taylor", 192, 64)
        return [argv[argv.index(f"--block_attention_layer_{k}") + 1] for k in ("start", "end")]

    assert bench_peers.kv_heads_removed(0.2667, 192, 64) == (52, 0)
    assert attention_range(0.2667) == ["28", "28"]  # some channels, no whole head: crashes
    assert attention_range(0.0) == ["3", "28"]  # no channel: their code skips the group
    assert bench_peers.kv_heads_removed(0.5146, 192, 64) == (99, 1)
    assert attention_range(0.5146) == ["3", "28"]


def test_extra_rows_parse_name_ratio_and_flags():
    specs = ["a=--criterion flap --gqa kv", "b@0.2=--uniform --target channels"]
    assert bench_peers.extras(specs, 0.2) == [
        ("a", ["--criterion", "flap", "--gqa", "kv"]),
        ("b", ["--uniform", "--target", "channels"]),
    ]
    assert bench_peers.extras(specs, 0.5) == [("a", ["--criterion", "flap", "--gqa", "kv"])]
    for bad in ("default=--uniform", "no-flags"):
        with pytest.raises(SystemExit):
            bench_peers.extras([bad], 0.2)


def test_checkout_error_names_the_path_and_the_commit(tmp_path):
    missing = tmp_path / "nowhere"
    err = bench_peers.checkout_error(str(missing), "a/b", "0" * 40, ())
    assert str(missing) in err and "0" * 40 in err and "\n" not in err
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    err = bench_peers.checkout_error(str(repo), "a/b", "1" * 40, ("f.py",))
    assert head in err and "1" * 40 in err and str(repo) in err
    assert bench_peers.checkout_error(str(repo), "a/b", head, ("f.py",)) is None
    err = bench_peers.checkout_error(str(repo), "a/b", head, ("f.py", "lib/prune.py"))
    assert "lib/prune.py" in err


def test_main_refuses_a_missing_checkout_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "FLAP")
    argv = ["--flap-dir", missing, "--calib", "c", "--test", "t", "--cache-dir", "m"]
    assert bench_peers.main([*argv, "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and missing in err[0] and bench_peers.FLAP_COMMIT in err[0]
    assert not (tmp_path / "w").exists()


def test_chunked_backward_gives_the_full_batch_gradient():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama-gqa"))
    ids = torch.randint(0, 128, (5, 12))
    model(ids, labels=ids).loss.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.forward = bench_peers.chunked_backward_forward(model, 2)
    loss = model(ids, labels=ids).loss
    loss.backward()  # what the caller does: adds nothing
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[n], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert model(ids).logits.shape == (5, 12, 128)


def test_rotary_hook_lets_a_layer_run_from_position_ids():
    model = AutoModelForCausalLM.from_config(tiny_config("llama-gqa")).eval()
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        hooks = bench_peers.add_rotary_hook(model)
        out = model.model.layers[0](hidden[0], attention_mask=None, position_ids=None)
        for h in hooks:
            h.remove()
    torch.testing.assert_close(out, hidden[1])


def test_a_layer_without_heads_or_channels_returns_its_biases():
    model = AutoModelForCausalLM.from_config(tiny_config("llama-gqa")).eval()
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    for lin in (attn.o_proj, mlp.down_proj):
        lin.bias = torch.nn.Parameter(torch.randn(lin.out_features))
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            lin.weight.data = lin.weight.data[:0]
            lin.out_features = 0
        for lin in (attn.o_proj, mlp.down_proj):
            lin.weight.data = lin.weight.data[:, :0]
            lin.in_features = 0
        assert bench_peers.fix_empty_attention(model) == 1
        x = torch.randn(2, 7, 64)
        out, _ = attn(x, position_embeddings=model.model.rotary_emb(x, torch.arange(7)[None]))
        torch.testing.assert_close(out, attn.o_proj.bias.expand(2, 7, 64))
        torch.testing.assert_close(mlp(x), mlp.down_proj.bias.expand(2, 7, 64))
        assert model(torch.randint(0, 128, (1, 9))).logits.shape == (1, 9, 128)


# ---- the peers' own code on a tiny GQA model (needs the checkouts) ----


def _peer_dir(var: str, repo: str, commit: str, files) -> str:
    path = os.environ.get(var)
    if not path:
        pytest.skip(f"{var} not set (a checkout of {repo})")
    err = bench_peers.checkout_error(path, repo, commit, files)
    if err:
        pytest.skip(err)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """3-layer LLaMA with SmolLM2's attention shape ratios: 3 query heads of 64 per KV head
    (the shape FLAP's compression weight fits), a vocabulary covering LLM-Pruner's trace ids."""
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=96,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)  # llama3.py loads one
    return str(path)


def _args(tmp_path, model_dir, **kw):
    base = dict(
        cache_dir=model_dir,
        seed=0,
        flap_metrics="WIFV",
        layers="1-1",
        nsamples=4,
        grad_chunk=3,
        llm_pruner_taylor="param_first",
        work_dir=str(tmp_path),
    )
    return argparse.Namespace(**(base | kw))


@pytest.fixture
def flap_dir():
    return _peer_dir(
        "MINILLM_FLAP_DIR", bench_peers.FLAP_REPO, bench_peers.FLAP_COMMIT, bench_peers.FLAP_FILES
    )


@pytest.fixture
def llm_pruner_dir():
    return _peer_dir(
        "MINILLM_LLM_PRUNER_DIR",
        bench_peers.LLM_PRUNER_REPO,
        bench_peers.LLM_PRUNER_COMMIT,
        bench_peers.LLM_PRUNER_FILES,
    )


def test_official_flap_on_a_tiny_gqa_model(tmp_path, flap_dir, tiny_dir):
    flap = flap_dir
    calib = torch.randint(0, 32000, (4, 16))
    dense = bench_peers.flap_model(tiny_dir)
    model = bench_peers.run_flap(_args(tmp_path, tiny_dir, flap_dir=flap), calib, None, 0.4)
    assert bench_peers.n_params(model) < bench_peers.n_params(dense)
    for layer in model.model.layers:
        attn = layer.self_attn
        assert (
            attn.q_proj.out_features
            == 3 * attn.k_proj.out_features
            == 3 * (attn.v_proj.out_features)
        )
        assert attn.o_proj.in_features == attn.q_proj.out_features
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()


def test_official_llm_pruner_on_a_tiny_gqa_model(tmp_path, llm_pruner_dir, tiny_dir):
    lp = llm_pruner_dir
    calib = torch.randint(0, 32000, (4, 16))
    args = _args(tmp_path, tiny_dir, llm_pruner_dir=lp)
    dry = bench_peers.run_llm_pruner(args, calib, 0.5, "l2")
    model = bench_peers.run_llm_pruner(args, calib, 0.5, "taylor")
    assert bench_peers.n_params(model) == bench_peers.n_params(dry)
    layer = model.model.layers[1]
    assert layer.self_attn.k_proj.out_features == 64  # one of two KV groups left
    assert layer.self_attn.q_proj.out_features == 192
    assert layer.mlp.gate_proj.out_features == 48
    assert model.model.layers[0].mlp.gate_proj.out_features == 96  # outside --layers
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()
