"""Table row formats side by side: bytes, validation loss of the main job's trained Engram model, tokens/s.

Trains examples/main.py's Engram model (its defaults, seed 0; or loads `--model`, a folder main.py saved), then for
each format converts the fp32 tables (`quantize_engram_tables`), saves the model and measures:
- bytes per row and table bytes (the safetensors tensors of the tables, scales included);
- validation loss on main.py's validation blocks, against fp32;
- inference tokens/s over the validation blocks with host tables and with cold disk tables (pages dropped from
  the page cache before each timed pass), formats interleaved round by round.
A second part gathers random rows from a large synthetic table per format on cold disk (rows/s), where fewer bytes
per row mean fewer pages read.

    OMP_NUM_THREADS=1 python bench/row_formats.py            # about 6 min here

Other options go to examples/main.py (e.g. `--steps 750`).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import main  # noqa: E402  (examples/main.py)

from modeling_engram import ROW_FORMATS, EngramForCausalLM  # noqa: E402
from modeling_engram.memory import EngramTable, safetensors_index  # noqa: E402
from modeling_engram.storage import FileMapping  # noqa: E402
from modeling_engram.training import engram_tables  # noqa: E402

FORMATS = list(ROW_FORMATS)


def table_bytes(folder: Path) -> int:
    return sum(end - start for path in folder.glob("*.safetensors")
               for name, (_, _, start, end) in safetensors_index(str(path)).items() if ".engram.table." in name)


@torch.no_grad()
def tokens_per_second(model, loader, cold: bool) -> float:
    if cold:
        for table in engram_tables(model):
            table.storage.release_pages()
    tokens, started = 0, time.perf_counter()
    for batch in loader:
        model(batch["input_ids"])
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - started)


def trained_model(args, model_dir: Path | None):
    main_args = main.argument_parser().parse_args(args.main_options)
    tokenizer, token_map, compressed, train_blocks, val_loader, _ = main.prepare_data(main_args)
    if model_dir is not None:
        return EngramForCausalLM.from_pretrained(model_dir).eval(), val_loader
    config = main.model_configs(main_args, tokenizer, compressed)["Engram"]
    torch.manual_seed(0)
    model = EngramForCausalLM(config)
    model.set_token_map(token_map)
    main.train("Engram (seed 0)", model, train_blocks, val_loader, main_args, 0)
    return model.eval(), val_loader


def model_part(args, work: Path) -> list[dict]:
    model, val_loader = trained_model(args, args.model)
    fp32_dir = work / "fp32"
    model.save_pretrained(fp32_dir)
    rows = {}
    for name in FORMATS:
        converted = EngramForCausalLM.from_pretrained(fp32_dir).eval()
        converted.quantize_engram_tables(name)
        converted.save_pretrained(work / name)
        table = engram_tables(converted)[0]
        rows[name] = {"format": name, "row_bytes": ROW_FORMATS[name].row_bytes(table.head_dim),
                      "head_dim": table.head_dim, "rows": sum(t.num_embeddings for t in engram_tables(converted)),
                      "table_bytes": table_bytes(work / name),
                      "val_loss": main.validation_loss(converted, val_loader)}
    batches = [batch for _, batch in zip(range(args.batches), val_loader)]
    loaded = {(name, storage): EngramForCausalLM.from_pretrained(work / name, engram_storage=storage).eval()
              for name in FORMATS for storage in ("host", "disk")}
    speeds = {key: [] for key in loaded}
    for _ in range(args.rounds):
        for (name, storage), model in loaded.items():
            speeds[name, storage].append(tokens_per_second(model, batches, cold=storage == "disk"))
    for name in FORMATS:
        rows[name]["host_tokens_per_s"] = statistics.median(speeds[name, "host"])
        rows[name]["cold_disk_tokens_per_s"] = statistics.median(speeds[name, "disk"])
    return list(rows.values())


@torch.no_grad()
def gather_part(args, work: Path) -> list[dict]:
    """Cold-disk gathers of `args.gather_rows` random rows from a synthetic table of `args.table_rows` x 256, per
    format, interleaved round by round."""
    sizes, width = [args.table_rows], 256
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.table_rows, (1, args.gather_rows, 1), generator=generator)
    disks, seconds = {}, {name: [] for name in FORMATS}
    for name in FORMATS:
        table = EngramTable(sizes, width, row_format="fp32")
        table.weight.normal_(0, 0.02, generator=generator)
        if name != "fp32":
            table.convert_rows(name)
        path = work / f"gather_{name}.safetensors"
        tensors = {"weight": table.weight.detach()}
        if table.weight_scale is not None:
            tensors["weight_scale"] = table.weight_scale
        save_file(tensors, str(path))
        del table, tensors
        index = safetensors_index(str(path))
        mappings = [FileMapping(str(path), index[key]) for key in ("weight", "weight_scale") if key in index]
        disk = EngramTable(sizes, width, storage="disk", row_format=name, from_checkpoint=True)
        disk.attach(*(disk.storage.hold(mapping, slice(None), torch.device("cpu")) for mapping in mappings))
        disks[name] = disk, path.stat().st_size
    for _ in range(args.rounds):
        for name, (disk, _) in disks.items():
            disk.storage.release_pages()
            started = time.perf_counter()
            disk(ids)
            seconds[name].append(time.perf_counter() - started)
    return [
        {"format": name, "table_bytes": size, "cold_rows_per_s": args.gather_rows / statistics.median(seconds[name])}
        for name, (_, size) in disks.items()
    ]


def main_bench():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a folder examples/main.py saved (default: train one)")
    parser.add_argument("--batches", type=int, default=4, help="validation batches (32 x 128 tokens) per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--table-rows", type=int, default=1_000_000)
    parser.add_argument("--gather-rows", type=int, default=200_000, help="rows per cold gather (random, repeats kept)")
    parser.add_argument("--parts", default="model,gather", help="which parts to run: model, gather or both")
    args, args.main_options = parser.parse_known_args()  # the rest are examples/main.py's options
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        model_rows = model_part(args, Path(work)) if "model" in args.parts else []
        gather_rows = gather_part(args, Path(work)) if "gather" in args.parts else []
    if model_rows:
        print_model_rows(model_rows)
    if gather_rows:
        print_gather_rows(gather_rows, args)


def print_model_rows(model_rows: list[dict]) -> None:
    fp32 = model_rows[0]
    print("\n| format | bytes/row | table bytes | val loss | vs fp32 | host tok/s | cold disk tok/s |")
    print("|---|---|---|---|---|---|---|")
    for row in model_rows:
        smaller = fp32["table_bytes"] / row["table_bytes"]
        print(f"| {row['format']} | {row['row_bytes']} | {row['table_bytes']:,} ({smaller:.2f}x smaller) | "
              f"{row['val_loss']:.4f} | {row['val_loss'] - fp32['val_loss']:+.4f} | "
              f"{row['host_tokens_per_s']:,.0f} | {row['cold_disk_tokens_per_s']:,.0f} |")


def print_gather_rows(gather_rows: list[dict], args) -> None:
    print(f"\ncold-disk gathers of {args.gather_rows:,} random rows from a {args.table_rows:,} x 256 table")
    print("| format | file bytes | rows/s | vs fp32 |")
    print("|---|---|---|---|")
    for row in gather_rows:
        print(f"| {row['format']} | {row['table_bytes']:,} | {row['cold_rows_per_s']:,.0f} | "
              f"{row['cold_rows_per_s'] / gather_rows[0]['cold_rows_per_s']:.2f}x |")


if __name__ == "__main__":
    main_bench()
