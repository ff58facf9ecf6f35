"""What makes the Engram memory adapter learn facts without forgetting: examples/knowledge_injection.py with one
setting changed at a time, the base model loaded once.

Each variant is `method:key=value,key=value` (method defaults to engram; keys are the example's options with
underscores, plus `lr`). It prints and appends one JSON line per variant to `--out`: test recall (seen, paraphrase),
validation recall, known-fact retention and general-loss change against the base. docs/benchmarks.md records a run.

    python bench/knowledge_sweep.py --variants lr=1e-2 lr=3e-2,engram_init=rows max_ngram=4 layers=1+10
"""

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("knowledge_injection", ROOT / "examples" / "knowledge_injection.py")
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


def apply(args, variant: str) -> tuple[str, float, argparse.Namespace]:
    """(method, lr, args with the variant's settings) for `variant` = `[method:]key=value,...`."""
    method, _, settings = variant.rpartition(":")
    args, lr = copy.deepcopy(args), None
    for item in filter(None, settings.split(",")):
        key, value = item.split("=")
        if key == "lr":
            lr = float(value)
        elif key == "layers":
            args.layers = [int(v) for v in value.split("+")]
        else:
            current = getattr(args, key)
            setattr(args, key, value if isinstance(current, str) else type(current)(float(value)))
    return method or "engram", lr, args


def main():
    parser = example.parser()
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--sweep-out", type=Path, default=Path("outputs/knowledge_sweep.jsonl"))
    args = parser.parse_args()
    args.sweep_out.parent.mkdir(parents=True, exist_ok=True)
    base, tokenizer, _, evaluation, _ = example.prepare(args)
    reference = evaluation(base)
    print(f"base: {json.dumps({k: v for k, v in reference.items() if v is not None})}")
    ranks = {"lora": None, "lora-large": args.large_rank}
    for variant in args.variants:
        method, lr, settings = apply(args, variant)
        sequences = example.training_sequences(
            example.read_facts(settings.facts) if settings.facts else example.fictional_facts(settings.people,
                                                                                              settings.seed),
            tokenizer, settings.loss_on == "answer")
        if ranks["lora"] is None:
            dense = example.dense_engram_parameters(example.engram_model(base, tokenizer, args))
            ranks["lora"] = example.lora_rank_matching(base, dense)
        settings.ranks = ranks
        started = time.time()
        run, _ = example.run_method(method, lr, base, tokenizer, sequences, evaluation, reference, settings)
        run = {"variant": variant, **run, "wall_seconds": round(time.time() - started, 1)}
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()}), flush=True)
        with args.sweep_out.open("a") as file:
            file.write(json.dumps(run) + "\n")


if __name__ == "__main__":
    main()
