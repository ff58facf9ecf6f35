"""Table storage (device | host | disk), prefetch, hot-row cache and device maps."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from modeling_engram import EngramConfig, engram_device_map
from modeling_engram.memory import RowFetch
from modeling_engram.storage import HostStorage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model(hc_mult=4, engram_vocab_size=[3001, 3011])
    path = tmp_path_factory.mktemp("engram") / "model"
    model.save_pretrained(path)
    return model, path


def batch(seed=0, shape=(2, 13)):
    return torch.randint(3, 97, shape, generator=torch.Generator().manual_seed(seed))


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kwargs)


@torch.no_grad()
@pytest.mark.parametrize("storage", ["device", "host", "disk"])
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
@pytest.mark.parametrize("cache_rows", [0, 64], ids=["no-cache", "cache"])
def test_every_placement_gives_identical_logits(saved, storage, prefetch, cache_rows):
    model, path = saved
    loaded = load(path, engram_storage=storage, engram_prefetch=prefetch, engram_cache_rows=cache_rows)
    table = loaded.model.layers[0].engram.table
    assert table.storage.name == storage
    for seed in range(10):  # enough forwards for the cache to refresh and serve rows
        assert torch.equal(loaded(batch(seed)).logits, model(batch(seed)).logits)
    if cache_rows:
        assert table.cache.stats()["hits"] > 0


def test_disk_tables_are_memory_maps_and_host_tables_are_copies(saved):
    _, path = saved
    disk = load(path, engram_storage="disk").model.layers[0].engram.table.weight
    host = load(path, engram_storage="host").model.layers[0].engram.table.weight
    assert not disk.requires_grad and host.requires_grad
    assert torch.equal(disk, host)
    weights_file = path / "model.safetensors"
    maps = Path("/proc/self/maps").read_text()
    assert str(weights_file) in maps  # the disk table is backed by the checkpoint's pages


class TableReads(TorchDispatchMode):
    """Records every op that reads a given table weight, and flags any op whose output is table-sized."""

    def __init__(self, weight):
        super().__init__()
        self.storage = weight.untyped_storage().data_ptr()
        self.numel = weight.numel()
        self.reads, self.full_sized = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(t.untyped_storage().data_ptr() == self.storage for t in tensors if t.device.type != "meta"):
            self.reads.append((func.__name__, out.numel() if isinstance(out, torch.Tensor) else None))
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.numel() >= self.numel:
                self.full_sized.append(func.__name__)
        return out


@torch.no_grad()
@pytest.mark.parametrize("storage", ["host", "disk"])
def test_only_gathered_rows_are_read_or_moved(saved, storage):
    _, path = saved
    loaded = load(path, engram_storage=storage, engram_prefetch=False)
    table = loaded.model.layers[0].engram.table
    ids = batch(3, (2, 40))
    hash_ids = loaded.model.hasher(ids)[0]
    unique_rows = torch.unique(hash_ids + table.offsets).numel()
    with TableReads(table.weight) as watch:
        loaded(ids)
    assert watch.full_sized == []
    assert [name for name, _ in watch.reads] == ["embedding.default"]
    assert watch.reads[0][1] == unique_rows * table.head_dim  # deduplicated rows only


@torch.no_grad()
def test_the_row_watch_can_fail(saved, monkeypatch):
    """A table that copies itself to the execution device before gathering is caught."""
    _, path = saved
    loaded = load(path, engram_storage="host", engram_prefetch=False)
    table = loaded.model.layers[0].engram.table
    monkeypatch.setattr(HostStorage, "read_unique", lambda self, table, unique: table.weight.clone()[unique])
    with TableReads(table.weight) as watch:
        loaded(batch())
    assert watch.full_sized


@torch.no_grad()
def test_prefetch_runs_in_the_background_and_each_layer_waits_for_its_own_rows(saved, monkeypatch):
    _, path = saved
    loaded = load(path, engram_storage="host", engram_prefetch=True)
    threads = []
    original = HostStorage.read_unique

    def recording(self, table, unique):
        threads.append(threading.current_thread().name)
        return original(self, table, unique)

    monkeypatch.setattr(HostStorage, "read_unique", recording)
    hash_ids = loaded.model.hasher(batch())
    fetches = loaded.model.prefetch_rows(hash_ids)
    assert sorted(fetches) == [0, 2] and all(isinstance(f, RowFetch) for f in fetches.values())
    rows = {layer: fetch.wait() for layer, fetch in fetches.items()}
    assert all(name.startswith("engram-prefetch") for name in threads) and len(threads) == 2
    for layer, fetched in rows.items():
        direct = torch.nn.functional.embedding(hash_ids[layer] + loaded.model.layers[layer].engram.table.offsets,
                                               loaded.model.layers[layer].engram.table.weight).flatten(-2)
        assert torch.equal(fetched, direct)


def test_host_tables_train_and_get_gradients_through_prefetch(saved):
    _, path = saved
    loaded = load(path, engram_storage="host").train()
    ids = batch()
    loaded(ids, labels=ids).loss.backward()
    grad = loaded.model.layers[0].engram.table.weight.grad
    assert grad is not None and torch.count_nonzero(grad.abs().sum(-1)) > 0


def test_host_tables_stay_put_when_the_model_moves(saved):
    _, path = saved
    loaded = load(path, engram_storage="host").to(torch.float64)
    assert loaded.model.layers[0].engram.table.weight.dtype == torch.float32
    assert loaded.model.layers[0].engram.kv_proj.key_proj.weight.dtype == torch.float64
    assert loaded(batch()).logits.dtype == torch.float64


def test_hot_row_cache_statistics_and_training_bypass(saved):
    _, path = saved
    loaded = load(path, engram_storage="disk", engram_cache_rows=256)
    with torch.no_grad():
        for _ in range(16):
            loaded(batch(0))  # the same text again and again: its rows become hot at the 8th fetch
    stats = loaded.engram_cache_stats()
    assert set(stats) == {0, 2}
    assert stats[0]["hits"] == stats[0]["lookups"] // 2  # forwards 9..16 are served from the cache
    host = load(path, engram_storage="host", engram_cache_rows=32).train()
    host(batch(), labels=batch()).loss.backward()  # trainable rows are never served stale from a cache
    assert host.engram_cache_stats()[0]["lookups"] == 0


def paper_like_config(**overrides):
    settings = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, engram_layer_ids=[1, 3], n_head_per_ngram=4, n_embed_per_ngram=256,
                    engram_vocab_size=[1_000_003, 1_000_003], engram_pad_id=0)
    settings.update(overrides)
    return EngramConfig(**settings)


def test_device_map_keeps_the_backbone_on_the_gpu_and_tables_where_they_fit():
    config = paper_like_config()  # tables: 2 layers x 8M rows x 64 x 4 B = 4.1 GB; backbone ~ 10 MB
    tables = ["model.layers.1.engram.table", "model.layers.3.engram.table"]
    roomy = engram_device_map(config, device=0, max_memory={0: "8GB", "cpu": "8GB"})
    assert set(roomy.values()) == {0}
    tight = engram_device_map(config, device=0, max_memory={0: "1GB", "cpu": "8GB"})
    assert all(tight[t] == "cpu" for t in tables)
    assert {v for k, v in tight.items() if k not in tables} == {0}  # every backbone layer stays on the GPU
    small_host = engram_device_map(config, device=0, max_memory={0: "1GB", "cpu": "1GB"})
    assert all(small_host[t] == "disk" for t in tables)
    assert {v for k, v in small_host.items() if k not in tables} == {0}
    assert engram_device_map(config, tables="cpu", device=0)[tables[0]] == "cpu"


def test_device_map_from_pretrained_keeps_tables_out_of_accelerate(saved):
    model, path = saved
    device_map = engram_device_map(model.config, tables="disk", device="cpu")
    loaded = load(path, device_map=device_map)
    table = loaded.model.layers[0].engram.table
    assert loaded.config.engram_storage == "disk" and not hasattr(table, "_hf_hook")
    assert torch.equal(loaded(batch()).logits, model(batch()).logits)
    auto = load(path, device_map="auto", max_memory={"cpu": "100KB"})  # spills backbone blocks to disk
    assert auto.config.engram_storage == "disk"
    assert "disk" in set(auto.hf_device_map.values())
    # Accelerate hooks every offloaded Engram submodule, so the layer calls each module in turn: bit-identical to
    # the resident model doing the same (a hook on its gates makes it), and to its factored path up to rounding.
    offloaded = auto(batch()).logits
    handles = [layer.engram.gate.register_forward_hook(lambda *args: None)
               for layer in model.model.layers if layer.engram is not None]
    try:
        assert torch.equal(offloaded, model(batch()).logits)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(offloaded, model(batch()).logits, atol=1e-6, rtol=0)


def test_conflicting_table_placements_are_refused(saved):
    model, path = saved
    device_map = engram_device_map(model.config, tables="cpu", device="cpu")
    device_map["model.layers.2.engram.table"] = "disk"
    with pytest.raises(ValueError, match="one placement"):
        load(path, device_map=device_map)


def test_invalid_storage_is_named():
    with pytest.raises(ValueError, match="engram_storage='ssd' is invalid"):
        paper_like_config(engram_storage="ssd")


@pytest.mark.slow
def test_tables_larger_than_the_allowed_memory_load_from_disk_and_generate(tmp_path):
    """A 3.1 GB table (sparse file) loads with engram_storage='disk' and generates within a 1 GB peak RSS."""
    script = ROOT / "bench" / "large_table.py"
    result = subprocess.run([sys.executable, str(script), "--folder", str(tmp_path), "--table-gb", "3.2"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["table_bytes"] > 3e9
    assert report["peak_rss_bytes"] < 1e9
    assert report["generated_tokens"] == 8
