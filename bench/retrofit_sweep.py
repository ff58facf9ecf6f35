"""Why Engram-only retrofitting helps little in the example's budget: the same run with one setting changed at a time.

Uses examples/retrofit.py's data, model, training loop and defaults (SmolLM2-135M, the standard-library corpus,
steps of 8 x 64 tokens; docs/benchmarks.md records a run with --steps 40). Each variant trains Engram only
(backbone frozen) and reports held-out domain and general loss against the base model; LoRA-only runs at two of
the same learning rates for a fair reference. The example's learning rate (1e-2) is the best of this grid for both.

    python bench/retrofit_sweep.py --steps 40            # about 30 minutes on 2 CPU cores
    python bench/retrofit_sweep.py --variants lr=1e-2,table_lr_multiplier=1 layer=15
"""

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("retrofit_example", ROOT / "examples" / "retrofit.py")
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)

DEFAULT_VARIANTS = [
    "lr=1e-3",                            # a tenth of the example's learning rate
    "lr=1e-2",                            # the example's Engram-only run
    "lr=3e-2",
    "lr=1e-2,table_lr_multiplier=1",      # ... without the paper's 5x for the tables
    "lr=1e-2,table_lr_multiplier=25",
    "lr=1e-2,warmup=0",                   # no warm-up
    "lr=1e-2,table_init_std=1",           # table rows at nn.Embedding's scale instead of 0.02
    "lr=1e-2,layer=15",                   # a middle layer
    "lr=1e-2,table_rows=2000",            # 10x smaller tables
    "lr=1e-2,steps=120",                  # 3x the tokens of a 40-step run
    "lora:lr=1e-3",                       # LoRA-only (the example's rank) at the same learning rates
    "lora:lr=1e-2",
]


def apply(args, variant: str):
    args = copy.deepcopy(args)
    for item in filter(None, variant.removeprefix("lora:").split(",")):
        key, value = item.split("=")
        kind = {"warmup": int, "table_init_std": float}.get(key, type(getattr(args, key)))
        setattr(args, key, kind(float(value)))
    return args


def main():
    parser = example.parser()
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    parser.set_defaults(out=Path("outputs/retrofit_sweep"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base, tokenizer, train_blocks, domain, general, _ = example.prepare(args)
    reference = {"domain_loss": example.mean_loss(base, domain), "general_loss": example.mean_loss(base, general)}
    print(f"base: domain {reference['domain_loss']:.4f}, general {reference['general_loss']:.4f}")
    results = []
    for variant in args.variants:
        run = apply(args, variant)
        started = time.time()
        if variant.startswith("lora:"):
            from peft import get_peft_model

            rank = example.lora_rank_matching(base, example.dense_engram_parameters(
                example.retrofit(base, tokenizer, run)))
            model = get_peft_model(copy.deepcopy(base), example.backbone_lora_config(r=rank, train_engram=False))
        else:
            model = example.retrofit(base, tokenizer, run)
            example.freeze_backbone(model)
        example.train(variant or "example", model, train_blocks, run)
        row = {"variant": variant or "example (Engram-only)", "domain_loss": example.mean_loss(model, domain),
               "general_loss": example.mean_loss(model, general), "seconds": time.time() - started}
        if not variant.startswith("lora:"):
            value = model.model.layers[run.layer].engram.kv_proj.value_proj.weight
            row["value_proj_rms"] = float(value.detach().pow(2).mean().sqrt())
        results.append(row)
        print(f"{row['variant']}: domain {row['domain_loss'] - reference['domain_loss']:+.4f}, "
              f"general {row['general_loss'] - reference['general_loss']:+.4f} ({row['seconds']:.0f}s)")
    print("\n| variant | domain loss (vs base) | general loss (vs base) |\n|---|---|---|")
    for row in results:
        print(f"| {row['variant']} | {row['domain_loss']:.4f} ({row['domain_loss'] - reference['domain_loss']:+.4f}) | "
              f"{row['general_loss']:.4f} ({row['general_loss'] - reference['general_loss']:+.4f}) |")
    (args.out / "retrofit_sweep.json").write_text(json.dumps({"base": reference, "results": results}, indent=1))


if __name__ == "__main__":
    main()
