"""Sharded safetensors output: transformers and load_pruned read it; failures leave nothing."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from conftest import make_tiny_model
from test_io import logits
from test_surgery import prune_randomly
from transformers import AutoModelForCausalLM

from minillm.model import shards
from minillm.model.adapters import adapter_for
from minillm.model.io import OutputError, atomic_output_dir, load_pruned, save_pruned
from minillm.model.surgery import prune_layer
from minillm.prune import main

SMALL = 40_000  # bytes per shard: a tiny model becomes several shards


def _shard_names(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("model"))


def test_writer_splits_by_size_and_round_trips_every_dtype(tmp_path):
    state = {
        "a": torch.randn(100, 30),
        "b": torch.randn(50, 10).bfloat16(),
        "c": torch.arange(7),
        "d": torch.randn(100, 30).half(),
    }
    paths = shards.save_sharded(state, tmp_path, max_shard_bytes=12_000)
    # a (12,000 bytes) fills shard 1; b, c, d (7,056 bytes) fit in shard 2
    assert [p.name for p in paths] == [f"model-0000{k}-of-00002.safetensors" for k in (1, 2)]
    index = json.loads((tmp_path / shards.INDEX).read_text())
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"]["total_size"] == total
    assert index["weight_map"] == {"a": paths[0].name, **dict.fromkeys("bcd", paths[1].name)}
    back = shards.load_sharded(tmp_path)
    assert back.keys() == state.keys()
    for k, t in state.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa"])
def test_sharded_uniform_llama_loads_in_plain_transformers(family, token_batch, tmp_path):
    model = make_tiny_model(family)
    adapter = adapter_for(model)
    for layer in range(3):
        prune_layer(model, adapter, layer, None, torch.arange(0, 96, 2))
    save_pruned(model, None, tmp_path, max_shard_bytes=SMALL)
    assert (tmp_path / shards.INDEX).is_file() and len(_shard_names(tmp_path)) > 3
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(plain, token_batch), logits(model, token_batch))


def test_sharded_per_layer_model_reloads_with_load_pruned(tiny_model, token_batch, tmp_path):
    prune_randomly(tiny_model, uniform=False)
    save_pruned(tiny_model, None, tmp_path, max_shard_bytes=SMALL)
    assert (tmp_path / shards.INDEX).is_file()
    reloaded = load_pruned(tmp_path)
    torch.testing.assert_close(logits(reloaded, token_batch), logits(tiny_model, token_batch))


def test_full_disk_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model = make_tiny_model("llama-gqa")
    calls = []
    real_write = shards._Shard.write

    def write(self, name, t):
        calls.append(name)
        if len(calls) == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, name, t)

    monkeypatch.setattr(shards._Shard, "write", write)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="--out: writing .* No space left on device"):
        with atomic_output_dir(out) as tmp:
            save_pruned(model, None, tmp, max_shard_bytes=SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["llama-mha"])
def test_out_whose_parent_cannot_be_written_is_named(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir
    (tmp_path / "a-file").write_text("not a directory")
    rc = main(
        [str(model_dir), "--criterion", "magnitude"]
        + ["--out", str(tmp_path / "a-file" / "out"), "--quiet"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("python -m minillm.prune: error: --out: cannot create")
    assert ".tmp-" not in err
    assert "a-file' is not a writable directory" in err


def test_out_failing_at_creation_is_named_not_its_temporary(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr("pathlib.Path.mkdir", refuse)
    with pytest.raises(OutputError, match="--out: cannot create .*out': Permission denied$"):
        with atomic_output_dir(tmp_path / "out"):
            pass


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt"])
def test_damaged_shard_is_named(damage, tmp_path):
    model = make_tiny_model("llama-gqa")
    save_pruned(model, None, tmp_path, max_shard_bytes=SMALL)
    shard = tmp_path / _shard_names(tmp_path)[1]
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        shard.write_bytes(b"\x08" + shard.read_bytes()[1:])
    with pytest.raises((ValueError, FileNotFoundError), match=str(shard)):
        load_pruned(tmp_path)
