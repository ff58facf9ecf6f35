"""What moves the main job's Engram-vs-MoE gap: examples/main.py's models with one setting changed at a time.

Every variant trains the chosen models of `examples/main.py` (same corpus, tokenizer, data order, schedule and
optimizer recipe; the MoE and Engram keep equal total and activated parameters through `allocate`) once per seed
and prints the final validation losses. A variant is a list of `name=value` settings: main.py's options with
underscores: `steps=750`, `rho=0.6`, `experts=16`, `table_lr_multiplier=1`, `router_bias_speed=1e-3`,
`engram_layer=2`, ...

    python bench/main_job_sweep.py --models MoE,Engram --seeds 0,1,2 steps=750
    python bench/main_job_sweep.py --models Engram --seeds 0,1,2 table_lr_multiplier=1

Appends one JSON line per run to --out (default outputs/main_job_sweep.jsonl); docs/benchmarks.md records them.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import main  # noqa: E402  (examples/main.py)

from modeling_engram import EngramForCausalLM  # noqa: E402


def settings(pairs: list[str]) -> argparse.Namespace:
    """main.py's options, parsed by its own parser, with `name=value` pairs given as `--name value`."""
    argv = []
    for pair in pairs:
        name, value = pair.split("=", 1)
        argv += [f"--{name.replace('_', '-')}", value]
    return main.argument_parser().parse_args(argv)


def main_sweep():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", nargs="*", help="name=value settings (none: main.py's defaults)")
    parser.add_argument("--models", default="MoE,Engram", help="comma-separated, of MoE, Engram, dense")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("outputs/main_job_sweep.jsonl"))
    sweep = parser.parse_args()
    args = settings(sweep.variant)
    tokenizer, token_map, compressed, train_blocks, val_loader, _ = main.prepare_data(args)
    configs = main.model_configs(args, tokenizer, compressed)
    sweep.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in sweep.seeds.split(",")]:
        for name in sweep.models.split(","):
            torch.manual_seed(seed)
            model = EngramForCausalLM(configs[name])
            model.set_token_map(token_map)
            run = main.train(f"{name} (seed {seed})", model, train_blocks, val_loader, args, seed)
            record = {"variant": sweep.variant, "model": name, "seed": seed, "val_loss": run["val_loss"][-1][1],
                      "engram_layer_ids": configs[name].engram_layer_ids,
                      "n_routed_experts": configs[name].n_routed_experts,
                      "val_curve": run["val_loss"], "tokens_per_second": run["tokens_per_second"]}
            print(f"{' '.join(sweep.variant) or 'defaults'}: {name} seed {seed}: val loss {record['val_loss']:.4f}")
            with sweep.out.open("a") as file:
                file.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main_sweep()
