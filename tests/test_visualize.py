"""gate_heatmap: gate values per token, per Engram layer and branch, as PNG and HTML."""

import html

import torch
from conftest import make_tiny_tokenizer, require, tiny_model

matplotlib = require("matplotlib")
import matplotlib.image  # noqa: E402

from modeling_engram.engram_layer import signed_sqrt_gate
from modeling_engram.visualize import gate_heatmap, gate_values

TEXT = "for layer in model.layers:\n    total += layer(x) & 0x1f  # <tag>\n"


def test_heatmap_files_and_values(tmp_path):
    tokenizer = make_tiny_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), hc_mult=2).train()
    gates = gate_heatmap(model, tokenizer, TEXT, tmp_path / "gates")
    assert model.training  # restored
    ids = tokenizer(TEXT)["input_ids"]
    assert sorted(gates) == [0, 2]
    for values in gates.values():
        assert values.shape == (len(ids), 2) and ((values > 0) & (values < 1)).all()
    image = matplotlib.image.imread(tmp_path / "gates.png")
    assert image.shape[0] > 100 and image.shape[1] > 1000
    page = (tmp_path / "gates.html").read_text()
    assert page.count("<span") == 4 * len(ids) and page.count("<h3>") == 4
    assert html.escape("<tag>")[:4] in page and "layer 2, branch 1" in page
    first = f"gate {gates[0][0, 0].item():.3f}"
    assert first in page


@torch.no_grad()
def test_captured_gates_equal_the_gate_recomputed_from_the_layer_inputs():
    model = tiny_model(hc_mult=2)
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    captured = gate_values(model, ids)
    layer = model.model.layers[2].engram
    inputs = {}
    handle = layer.register_forward_hook(lambda m, args, kwargs, out: inputs.update(args=args, kwargs=kwargs),
                                         with_kwargs=True)
    model(ids)
    handle.remove()
    hidden, hash_ids = inputs["args"][:2]
    value, keys = layer.kv_proj(layer.table(hash_ids))
    key = layer.key_norm(keys.unflatten(-1, (2, 32)))
    query = layer.query_norm(hidden.unflatten(-1, (2, 32)))
    torch.testing.assert_close(captured[2], signed_sqrt_gate(query, key)[0, :, :, 0])
    other = gate_values(model, torch.roll(ids, 1, dims=1))
    assert not torch.allclose(other[2], captured[2])  # the values depend on the text
