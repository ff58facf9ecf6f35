"""Continue training a saved Engram model on local text files with `EngramTrainer`, in one or several processes.

The paper's recipe (tables: Adam at 5x the learning rate, no weight decay, sparse row updates; the rest AdamW), data
from `text_blocks_dataset` (tokenised with `datasets`, cut into blocks). Data-parallel runs all-reduce the tables'
sparse gradients, so every process holds identical tables; N processes with `--batch-size b` train exactly like
one process with `--batch-size N*b`.

    python examples/main.py                      # makes outputs/main/engram_model (model + tokenizer)
    python examples/train.py --model outputs/main/engram_model --out outputs/train     # standard-library source as data
    torchrun --standalone --nproc_per_node 2 examples/train.py --model outputs/main/engram_model --batch-size 4
    accelerate launch --multi_gpu --num_processes 2 examples/train.py --model outputs/main/engram_model --batch-size 4
    python examples/train.py --model outputs/main/engram_model --files notes/*.txt --bf16 --activation-checkpointing

On CPUs the processes use gloo (`accelerate launch` needs `--multi_gpu` for several processes, even there).
`--shard-tables` shards every table by rows over the processes (each holds 1/N of the rows and their Adam state,
and reads only those rows from the checkpoint); it is also how GPUs (NCCL, which has no sparse all-reduce) train
with sparse table updates. Without it, on GPUs pass --dense-table-grads.

    torchrun --standalone --nproc_per_node 2 examples/train.py --model outputs/main/engram_model --shard-tables

`--fsdp` shards the rest of the model too, with FSDP2 (`fully_shard` per decoder block and at the root), beside the
row-sharded tables (it needs `--shard-tables`): a backbone larger than one device trains. Checkpoints (`--save-steps`)
resume on any number of processes, with the same global batch (processes x --batch-size x --grad-accum):

    torchrun --standalone --nproc_per_node 2 examples/train.py --shard-tables --fsdp --batch-size 4 --save-steps 50
    torchrun --standalone --nproc_per_node 4 examples/train.py --shard-tables --fsdp --batch-size 2 \
        --resume outputs/train/checkpoint-50
"""

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from modeling_engram import EngramTrainer, text_blocks_dataset
from modeling_engram.training import backbone_optimizer_state_bytes, engram_tables
from modeling_engram.corpus import stdlib_files


def table_digests(model) -> dict[str, str]:
    """sha256 of every Engram table's bytes, to compare the tables held by different processes."""
    return {
        name: hashlib.sha256(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, param in model.named_parameters()
        if ".engram.table." in name
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("outputs/main/engram_model"),
                        help="saved model and tokenizer")
    parser.add_argument("--files", type=Path, nargs="*", help="text files (default: standard-library sources)")
    parser.add_argument("--max-files", type=int, default=200, help="standard-library files when --files is unset")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--table-lr-multiplier", type=float, default=5.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--dense-table-grads", action="store_true", help="for NCCL (no sparse all-reduce)")
    parser.add_argument("--shard-tables", action="store_true", help="shard the tables by rows over the processes")
    parser.add_argument("--fsdp", action="store_true", help="shard the rest with FSDP2 (needs --shard-tables)")
    parser.add_argument("--save-steps", type=int, default=0, help="save a Trainer checkpoint every N steps (0: never)")
    parser.add_argument("--resume", type=Path, help="resume from this Trainer checkpoint folder")
    parser.add_argument("--out", type=Path, default=Path("outputs/train"))
    parser.add_argument("--report", type=Path, help="write each process's losses and table digests here (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    training_args = TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10),
        bf16=args.bf16, activation_checkpointing=args.activation_checkpointing, logging_steps=1,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, report_to=[],
        seed=args.seed, disable_tqdm=True, ddp_find_unused_parameters=False, use_cpu=not torch.cuda.is_available(),
        **(dict(fsdp=True, fsdp_config={"fsdp_version": 2}) if args.fsdp else {}),
    )
    _ = training_args.device  # initialises the process group under torchrun / accelerate launch, which sharding needs
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, engram_table_parallel=args.shard_tables)
    files = args.files or stdlib_files(args.max_files, args.seed)[0]
    blocks = text_blocks_dataset(files, tokenizer, args.block_size)
    trainer = EngramTrainer(
        model=model, args=training_args, train_dataset=blocks, table_lr_multiplier=args.table_lr_multiplier,
        sparse_table_grads=not args.dense_table_grads,
    )
    trainer.train(resume_from_checkpoint=str(args.resume) if args.resume else None)
    rank, world_size = trainer.args.process_index, trainer.args.world_size
    if args.report:
        sparse = all(module.sparse for name, module in trainer.model.named_modules() if name.endswith("engram.table"))
        report = {"rank": rank, "world_size": world_size, "tables": table_digests(trainer.model), "sparse": sparse,
                  "table_bytes": sum(t.weight.nbytes for t in engram_tables(trainer.model)),
                  "fsdp": isinstance(trainer.model, FSDPModule),
                  "backbone_bytes": backbone_optimizer_state_bytes(trainer.optimizer, trainer.model)[1],
                  "fsdp_by_accelerate": trainer.is_fsdp_enabled,  # accelerate prepares FSDP on accelerators only
                  "log_history": trainer.state.log_history, "blocks": len(blocks)}
        args.report.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.report}.rank{rank}").write_text(json.dumps(report, indent=1))
    trainer.save_model()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.out)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        print(f"{world_size} process(es), {len(blocks)} blocks of {args.block_size} tokens: loss {losses[0]:.3f} -> "
              f"{losses[-1]:.3f}; saved to {args.out} (pid {os.getpid()})")


if __name__ == "__main__":
    main()
