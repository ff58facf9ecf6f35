"""Engram on a multi-branch stream: one table and value per layer, one key per branch, one matmul; PEFT on keys."""

import torch
from conftest import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

MATMULS = {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm"}


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.shapes.append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def test_one_table_one_value_and_one_key_per_branch():
    model = tiny_model(hc_mult=4)
    engram = model.model.layers[0].engram
    assert engram.table.weight.shape == (sum(model.config.engram_table_sizes[0]), 8)
    assert engram.kv_proj.value_proj.weight.shape == (32, 32)  # [hidden, d_mem], shared by the 4 branches
    assert engram.kv_proj.key_proj.weight.shape == (4 * 32, 32)  # W_K^(1..4) stacked
    assert engram.query_norm.weight.shape == engram.key_norm.weight.shape == (4, 32)


@torch.no_grad()
def test_value_and_all_keys_are_one_matmul():
    model = tiny_model(hc_mult=4)
    engram = model.model.layers[0].engram
    hidden = torch.randn(2, 7, 4 * 32)
    hash_ids = model.model.hasher(torch.randint(3, 97, (2, 7)))[0]
    with CountMatmuls() as counter:
        engram(hidden, hash_ids)
    assert counter.shapes == [((2 * 7, 32), (32, 32 + 4 * 32))]  # rows [B*T, d_mem] @ [value; keys]^T


@torch.no_grad()
def test_fused_projection_equals_the_separate_projections():
    kv_proj = tiny_model(hc_mult=4).model.layers[0].engram.kv_proj
    rows = torch.randn(3, 5, 32)
    value, keys = kv_proj(rows)
    torch.testing.assert_close(value, rows @ kv_proj.value_proj.weight.T)
    torch.testing.assert_close(keys, rows @ kv_proj.key_proj.weight.T)


def test_peft_trains_only_the_gating_parameters():
    """LoRA on the branch keys (`target_parameters`) plus the query/key norms; table and value stay frozen."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(hc_mult=4)
    batch = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(batch).logits
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".engram." in n}
    config = LoraConfig(r=4, target_modules=[], target_parameters=["kv_proj.key_proj.weight"],
                        modules_to_save=["query_norm", "key_norm"])
    peft_model = get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n and ".kv_proj." in n) or "_norm.modules_to_save" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.train()
    for _ in range(3):
        peft_model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        assert (peft_model(batch).logits - before).abs().max() > 1e-4
    for name, parameter in peft_model.named_parameters():
        original = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if original in frozen:
            assert torch.equal(parameter, frozen[original]), name
