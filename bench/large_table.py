"""Load and generate from a model whose Engram table is larger than the memory it is allowed.

    python bench/large_table.py --folder /tmp/engram-large --table-gb 3

Writes a two-shard safetensors checkpoint: the backbone (random, small) and one Engram table of `--table-gb`
GB as a sparse file (all zeros, so it costs no disk blocks), then loads it with `engram_storage="disk"`,
generates 8 tokens and prints a JSON line with the table size and the peak resident memory of the process.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sharded_tables import peak_rss  # noqa: E402

from modeling_engram import EngramConfig, EngramForCausalLM  # noqa: E402

HEAD_DIM = 16


def write_checkpoint(folder: Path, table_gb: float) -> int:
    heads = 4
    rows_per_head = int(table_gb * 1e9 / (4 * HEAD_DIM * heads * 2))
    config = EngramConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        engram_layer_ids=[1], n_head_per_ngram=heads, n_embed_per_ngram=heads * HEAD_DIM,
        engram_vocab_size=[rows_per_head, rows_per_head], engram_pad_id=0, pad_token_id=0, eos_token_id=1,
    )
    with torch.device("meta"):
        meta = EngramForCausalLM(config)
    small, table_name, table_shape = {}, None, None
    for name, tensor in meta.state_dict().items():
        if name.endswith("engram.table.weight"):
            table_name, table_shape = name, list(tensor.shape)
        elif name.endswith("token_map"):
            small[name] = torch.arange(config.vocab_size)
        else:
            small[name] = torch.randn(tensor.shape, dtype=tensor.dtype) * 0.02
    save_file(small, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    table_bytes = table_shape[0] * table_shape[1] * 4
    header = json.dumps({"__metadata__": {"format": "pt"},
                         table_name: {"dtype": "F32", "shape": table_shape, "data_offsets": [0, table_bytes]}})
    header = header.encode() + b" " * (-len(header) % 8)
    with open(folder / "model-00002-of-00002.safetensors", "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        handle.truncate(8 + len(header) + table_bytes)  # sparse: no blocks written
    weight_map = {name: "model-00001-of-00002.safetensors" for name in small}
    weight_map[table_name] = "model-00002-of-00002.safetensors"
    index = {"metadata": {"total_size": table_bytes + sum(t.numel() * t.element_size() for t in small.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(folder)
    return table_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--table-gb", type=float, default=3.0)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    table_bytes = write_checkpoint(args.folder, args.table_gb)
    started = time.perf_counter()
    model = EngramForCausalLM.from_pretrained(args.folder, engram_storage="disk")
    load_seconds = time.perf_counter() - started
    prompt = torch.randint(2, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    print(json.dumps({
        "table_bytes": table_bytes,
        "peak_rss_bytes": peak_rss(),  # this process's own: ru_maxrss starts at the peak of the process that started it
        "generated_tokens": out.shape[1] - prompt.shape[1],
        "load_seconds": round(load_seconds, 2),
    }))


if __name__ == "__main__":
    main()
