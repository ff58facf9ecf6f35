"""Training at table scale: the paper's optimizer recipe with sparse table updates, and `EngramTrainer`.

Recipe (the paper's Engram-27B settings): the memory tables train with Adam at `lr * table_lr_multiplier` (5 by
default) and no weight decay; every other parameter with AdamW and weight decay (biases and norm weights excluded,
as in `transformers.Trainer`). One optimizer holds both as parameter groups, so any LR scheduler drives both and the
table learning rate stays `table_lr_multiplier` times the rest at every step.

Sparse updates. A step must cost what the gathered rows cost, not what the table costs. `create_engram_optimizer`
switches every trainable `EngramTable` (an `nn.Embedding`) to sparse gradients: backward then yields a sparse COO
gradient holding only the gathered rows, and `EngramAdamW` updates only those rows and their moments (a lazy Adam:
a row's moments decay only when the row is gathered, with bias correction from the global step, as
`torch.optim.SparseAdam` and TF's LazyAdam do). Why sparse COO gradients rather than a side channel for row
gradients: they are what autograd, gradient accumulation and DistributedDataParallel (sparse all-reduce on gloo)
already understand, so `Trainer`, `accelerate` and `torchrun` work unchanged. The moments are dense buffers of the
table's shape and dtype, allocated once (optimizer state = 2x the table bytes, exactly what dense Adam keeps); only
the gathered rows of them are read and written per step. Dense moments keep exact Adam per row and a
checkpointable state of plain tensors; a per-row hash map would only save memory for rows that are never gathered.

torch has no norm for sparse tensors, and `Trainer` computes a gradient norm every step: enabling sparse table
gradients registers the missing kernel (`linalg_vector_norm` on sparse COO tensors: the norm of the coalesced
values), so `torch.nn.utils.clip_grad_norm_`, `accelerate` and `Trainer` clip and report norms over tables too.
"""

import logging
import math
import os
from collections.abc import Callable, Iterable

import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME

from . import distributed_checkpoint
from .engram_layer import EngramLayer
from .memory import EngramTable
from .modeling_engram import EngramPreTrainedModel
from .moe import EngramTopKRouter
from .sharded_training import clip_grad_norm_, shard_engram_model
from .table_parallel import RowShardedStorage, shard_engram_tables, sharded_tables

logger = logging.getLogger(__name__)

# Trainer's own rule for parameters without weight decay (transformers.Trainer.get_decay_parameter_names).
NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
TABLE_GROUP, DECAY_GROUP, NO_DECAY_GROUP = "engram_tables", "decay", "no_decay"
_SPARSE_NORM_LIBRARY = []  # keeps the torch.library registration alive


def engram_tables(model: nn.Module) -> list[EngramTable]:
    """Every Engram memory table of `model` (also inside a PEFT or DDP wrapper)."""
    return [module for module in model.modules() if isinstance(module, EngramTable)]


def check_trainable_row_format(model: nn.Module) -> None:
    """Refuse training a model whose Engram tables are FP8 (nothing can update e4m3 rows), unless only the gating
    trains (`gating_peft_config`: the tables stay frozen either way)."""
    fp8 = [table for table in engram_tables(model) if table.scaled]
    if not fp8:
        return
    gating = [f".{name}." for name in (*EngramLayer.gating_projections, *EngramLayer.gating_norms)]
    others = [name for name, p in model.named_parameters() if p.requires_grad and not any(g in name for g in gating)]
    if others:
        raise ValueError(
            f"this model's Engram tables are {fp8[0].format.name} (engram_row_format), which cannot be trained: "
            "train with fp32 or bf16 tables and quantise afterwards (`model.quantize_engram_tables('fp8_e4m3')`), "
            f"or fine-tune only the gating (`gating_peft_config`). Trainable parameters besides the gating: "
            f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}."
        )


def _sparse_vector_norm(tensor, ord=2, dim=None, keepdim=False, *, dtype=None):
    if dim is not None or keepdim:
        raise NotImplementedError("linalg.vector_norm of a sparse tensor: only the norm over all elements is defined")
    if ord < 0:
        raise NotImplementedError(f"linalg.vector_norm of a sparse tensor: ord={ord} < 0 is not supported")
    return torch.linalg.vector_norm(tensor.coalesce().values(), ord, dtype=dtype)


def register_sparse_grad_norm() -> None:
    """Give `torch.linalg.vector_norm` a kernel for sparse COO tensors (the norm of the coalesced values).

    torch has none, so `clip_grad_norm_` (and `Trainer`, which calls it every step) fails on sparse gradients.
    Registered once, and only where torch lacks it.
    """
    if _SPARSE_NORM_LIBRARY:
        return
    probe = torch.sparse_coo_tensor(torch.zeros(1, 1, dtype=torch.long), torch.ones(1), (2,), check_invariants=True)
    try:
        torch.linalg.vector_norm(probe)
        return
    except NotImplementedError:
        pass
    library = torch.library.Library("aten", "IMPL")
    for dispatch_key in ("SparseCPU", "SparseCUDA"):
        library.impl("linalg_vector_norm", _sparse_vector_norm, dispatch_key)
    _SPARSE_NORM_LIBRARY.append(library)


def _backend_for(device_type: str) -> str | None:
    backend = torch.distributed.get_backend()
    if ":" not in backend:
        return backend
    return dict(item.split(":") for item in backend.split(",")).get(device_type)


def check_sparse_grad_support(tables: Iterable[nn.Module]) -> None:
    """Raise a ValueError where sparse table gradients cannot be all-reduced (NCCL has no sparse all-reduce).
    Sharded tables (table_parallel.py) are never all-reduced: they pass on every backend."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for device_type in {t.weight.device.type for t in tables if not isinstance(t.storage, RowShardedStorage)}:
        if _backend_for(device_type) == "nccl":
            raise ValueError(
                f"Sparse Engram table gradients cannot be all-reduced by the NCCL backend (tables on {device_type}): "
                "NCCL has no sparse all-reduce. Shard the tables over the ranks instead (EngramTrainer(shard_tables="
                "True), from_pretrained(..., engram_table_parallel=True) or shard_engram_tables), use the gloo backend, "
                "or pass sparse_table_grads=False for dense table gradients: each step then costs O(table rows) in "
                "backward, all-reduce and optimizer."
            )


def set_sparse_table_grads(model: nn.Module, enabled: bool = True) -> list[EngramTable]:
    """Make every trainable Engram table of `model` produce sparse (`enabled`) or dense gradients.

    Do this before wrapping the model in DistributedDataParallel (`accelerator.prepare`): DDP decides at
    construction which parameters get sparse all-reduces. Returns the trainable tables.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "set sparse table gradients (create_engram_optimizer) on the model before wrapping it in "
            "DistributedDataParallel / accelerator.prepare: DDP decides at construction which parameters "
            "get sparse all-reduces."
        )
    tables = [table for table in engram_tables(model) if table.weight.requires_grad]
    if enabled:
        check_sparse_grad_support(tables)
        register_sparse_grad_norm()
    for table in tables:
        table.sparse = enabled
    return tables


class EngramAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose parameters may have sparse COO gradients, updated lazily per row.

    Dense gradients take torch's own functional Adam (`torch.optim.adam.adam`, decoupled weight decay), so dense
    groups match `torch.optim.AdamW`. A sparse gradient [rows, D] updates only its rows: their moments, then the parameter rows,
    with bias correction from the parameter's global step count. For a row gathered at every step this equals
    dense Adam exactly; a row not gathered keeps its value and its moments. Sparse gradients need weight_decay 0.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(
                f"EngramAdamW: lr={lr}, eps={eps}, weight_decay={weight_decay} must be >= 0 "
                f"and betas={betas} in [0, 1)."
            )
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dense = []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    self._sparse_step(param, group)
                else:
                    dense.append(param)
            if dense:
                self._dense_step(dense, group)
        return loss

    def _dense_step(self, params: list[torch.Tensor], group: dict) -> None:
        states = [self._state(param) for param in params]
        beta1, beta2 = group["betas"]
        adam(
            params,
            [param.grad for param in params],
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],
            [state["step"] for state in states],
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _sparse_step(self, param: torch.Tensor, group: dict) -> None:
        if group["weight_decay"]:
            raise ValueError(
                f"EngramAdamW: weight_decay={group['weight_decay']} on a parameter with sparse gradients (an Engram "
                "table); the paper's recipe uses none. Put the tables in a group with weight_decay=0 "
                "(create_engram_optimizer does)."
            )
        grad = param.grad.coalesce()  # duplicate rows (one n-gram read twice) summed
        rows, values = grad.indices()[0], grad.values()
        state = self._state(param)
        state["step"] += 1
        step = state["step"].item()
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        param.index_add_(0, rows, exp_avg / denom, alpha=-group["lr"] / (1 - beta1**step))


def engram_parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, table_lr_multiplier: float = 5.0
) -> list[dict]:
    """Parameter groups of the recipe: tables (lr x multiplier, no decay), decayed, and biases/norms (no decay).

    Only parameters that require grad; empty groups are left out. Each group carries its `name`.
    """
    from transformers.trainer_pt_utils import get_parameter_names

    table_ids = {id(table.weight) for table in engram_tables(model)}
    decay_names = set(get_parameter_names(model, [nn.LayerNorm], NO_DECAY_NAME_PATTERNS))
    tables, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in table_ids:
            tables.append(param)
        elif name in decay_names:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [  # tables last: Trainer logs the first group's learning rate as the run's
        {"name": DECAY_GROUP, "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": NO_DECAY_GROUP, "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"name": TABLE_GROUP, "params": tables, "lr": lr * table_lr_multiplier, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def create_engram_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    table_lr_multiplier: float = 5.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    sparse_table_grads: bool = True,
) -> EngramAdamW:
    """The paper's optimizer: tables with Adam at `lr * table_lr_multiplier` and no weight decay, the rest AdamW.

    With `sparse_table_grads` (default) the trainable tables of `model` are switched to sparse gradients, so a step
    touches only the gathered rows (see the module docstring); call it before wrapping the model for
    data-parallel training. Works in a plain loop, with `accelerate`, and with `transformers.Trainer`
    (`Trainer(..., optimizers=(create_engram_optimizer(model, lr=...), None))`; `EngramTrainer` does it for you).

    Returns one `EngramAdamW` whose param groups are named "decay", "no_decay" and "engram_tables". With DeepSeekMoE
    layers it also calls `model.update_router_biases()` after every step (expert balancing, no gradient).
    """
    if table_lr_multiplier <= 0:
        raise ValueError(f"table_lr_multiplier={table_lr_multiplier} is invalid; it must be > 0.")
    check_trainable_row_format(model)
    set_sparse_table_grads(model, sparse_table_grads)
    groups = engram_parameter_groups(model, lr, weight_decay, table_lr_multiplier)
    optimizer = EngramAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    engram = next((m for m in model.modules() if isinstance(m, EngramPreTrainedModel)), None)
    if engram is not None and any(isinstance(m, EngramTopKRouter) for m in engram.modules()):
        optimizer.register_step_post_hook(lambda *_: engram.update_router_biases())
    return optimizer


def _rank_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[int, int]:
    """(bytes of optimizer state held for `params`, bytes of `params`) on this rank: FSDP2's DTensors count their
    local shard."""
    def held(tensor: torch.Tensor) -> int:
        tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return tensor.numel() * tensor.element_size()

    state = sum(held(value) for param in params for value in optimizer.state.get(param, {}).values()
                if isinstance(value, torch.Tensor))
    return state, sum(held(param) for param in params)


def table_optimizer_state_bytes(optimizer: torch.optim.Optimizer, model: nn.Module) -> tuple[int, int]:
    """(bytes of optimizer state held for the Engram tables, bytes of the tables themselves), on this rank."""
    return _rank_bytes(optimizer, [table.weight for table in engram_tables(model)])


def backbone_optimizer_state_bytes(optimizer: torch.optim.Optimizer, model: nn.Module) -> tuple[int, int]:
    """(bytes of optimizer state held for every parameter but the tables, bytes of those parameters), on this rank
    (under FSDP2: its shards)."""
    tables = {id(table.weight) for table in engram_tables(model)}
    return _rank_bytes(optimizer, [param for param in model.parameters() if id(param) not in tables])


class EngramTrainer(Trainer):
    """`transformers.Trainer` that trains with the paper's recipe (`create_engram_optimizer`) by default.

    Extra arguments: `table_lr_multiplier` (5.0), `sparse_table_grads` (True), `shard_tables` (False: True shards the
    tables by rows over the ranks, `shard_engram_tables`) and `allow_global_batch_change` (False: see below). The
    optimizer's learning rate, weight decay, betas and epsilon come from `TrainingArguments`, and its scheduler drives
    tables and the rest. Passing `optimizers=` or `optimizer_cls_and_kwargs=`, or an `args.optim` other than torch
    AdamW, falls back to `Trainer`'s own optimizer (tables then get dense gradients).

    FSDP2 (`TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2})`, or `accelerate launch` with an
    FSDP2 config) shards the rest of the model with `shard_engram_model`: the tables must be row-sharded
    (`shard_tables=True`, or a model loaded with `engram_table_parallel=True`) and stay out of FSDP. With `bf16` the
    backbone computes in bf16 and reduces gradients in fp32.

    With sharded tables the gradient norm spans every rank's shard, `save_model` writes a standard checkpoint (every
    rank its own rows; FSDP's shards gathered on the main process), and Trainer checkpoints hold the model and
    optimizer state in torch.distributed.checkpoint format (`distributed_checkpoint.py`), which resumes on any
    number of ranks. Resuming checks the checkpoint's Engram config and global batch (per-device batch x gradient
    accumulation x ranks); `allow_global_batch_change=True` resumes with another batch on purpose.
    """

    ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused")

    def __init__(
        self,
        *args,
        table_lr_multiplier: float = 5.0,
        sparse_table_grads: bool = True,
        shard_tables: bool = False,
        allow_global_batch_change: bool = False,
        **kwargs,
    ):
        self.table_lr_multiplier = table_lr_multiplier
        self.sparse_table_grads = sparse_table_grads
        self.allow_global_batch_change = allow_global_batch_change
        super().__init__(*args, **kwargs)
        if shard_tables and not sharded_tables(self.model):
            shard_engram_tables(self.model)
        plugin = self._fsdp_plugin()
        if plugin is not None:
            self._shard_with_fsdp2(plugin)
        self.sharded = bool(sharded_tables(self.model))

    def _fsdp_plugin(self):
        """The FSDP settings this run asks for: accelerate's plugin, or where accelerate ignores FSDP (it shards on
        accelerators only, and would wrap the model in DDP on CPUs) the plugin that TrainingArguments' `fsdp` /
        `fsdp_config` or `accelerate launch`'s FSDP environment describe. None without FSDP."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is None and self.args.fsdp_plugin_args is not None:
            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        elif plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            plugin = FullyShardedDataParallelPlugin()  # reads accelerate launch's FSDP_* environment
        return plugin

    def _shard_with_fsdp2(self, plugin) -> None:
        """Apply FSDP2 before accelerate prepares the model, with the table shards in `ignored_params` (accelerate's
        plugin cannot name them): accelerate's FSDP2 path leaves an `FSDPModule` as it is."""
        refusal = None
        if plugin.fsdp_version != 2:
            refusal = ("FSDP1 flattens parameters into dense buffers, which row-sharded tables and their sparse updates "
                       "do not survive: use FSDP2 (fsdp_config={'fsdp_version': 2}, or accelerate's --fsdp_version 2)")
        elif not sharded_tables(self.model):
            refusal = ("FSDP2 over Engram tables that are not row-sharded would all-gather every whole table at each "
                       "forward: pass shard_tables=True (or load with engram_table_parallel=True), and the tables stay "
                       "out of FSDP, sharded by rows")
        elif plugin.activation_checkpointing:
            refusal = ("the FSDP plugin's activation_checkpointing is not applied to a model sharded before accelerate "
                       "prepares it: pass TrainingArguments(activation_checkpointing=True) instead")
        elif isinstance(plugin.cpu_offload, CPUOffloadPolicy):
            refusal = "FSDP2 CPU offload of the backbone is not supported beside row-sharded tables"

        if refusal:
            raise ValueError(f"EngramTrainer: {refusal}.")
        bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_engram_model(self.model, fsdp=True, mp_policy=bf16 if self.args.bf16 else None,
                           reshard_after_forward=bool(plugin.reshard_after_forward))
        if not self.is_fsdp_enabled:
            # accelerate's own mark of a model it must not wrap again: on CPUs it would wrap FSDP's DTensor
            # parameters in DDP, which it refuses. The model already shards and reduces its own gradients.
            self.model._is_accelerate_prepared = True

    @property
    def _global_batch(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size

    def _unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    # Private Trainer methods (signatures pinned by tests/test_private_api.py): no callback or argument lets a norm
    # or an optimizer save/load span row shards that live on different ranks.
    def _clip_grad_norm(self, model):
        if not self.sharded:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return clip_grad_norm_(model, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.sharded:
            grad_norm = clip_grad_norm_(model, float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; with sharded tables a collective save of one standard checkpoint (all ranks)."""
        if not self.sharded:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self._unwrapped().save_pretrained(output_dir, is_main_process=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        distributed_checkpoint.save_training_state(self._unwrapped(), self.optimizer, output_dir, self._global_batch)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self._unwrapped()
        distributed_checkpoint.check_resumable(model, resume_from_checkpoint, self._global_batch,
                                               self.allow_global_batch_change)
        distributed_checkpoint.load_model_state(model, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.sharded or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        distributed_checkpoint.load_optimizer_state(self._unwrapped(), self.optimizer, checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def create_optimizer(self, model=None):
        model = self.model if model is None else model
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            optim = getattr(self.args.optim, "value", self.args.optim)
            if optim in self.ADAMW_NAMES:
                if self.sparse_table_grads and self.is_deepspeed_enabled:
                    raise ValueError(
                        "EngramTrainer: sparse table gradients do not work under DeepSpeed (it flattens parameters into "
                        "dense shards). Use FSDP2 or DDP (torchrun / accelerate launch), or pass sparse_table_grads=False."
                    )
                self.optimizer = create_engram_optimizer(
                    model,
                    lr=self.args.learning_rate,
                    weight_decay=self.args.weight_decay,
                    table_lr_multiplier=self.table_lr_multiplier,
                    betas=(self.args.adam_beta1, self.args.adam_beta2),
                    eps=self.args.adam_epsilon,
                    sparse_table_grads=self.sparse_table_grads,
                )
            else:
                logger.warning(
                    f"EngramTrainer: args.optim={optim!r} is not torch AdamW; using Trainer's optimizer, so the tables "
                    "get dense gradients and no table learning-rate multiplier."
                )
        return super().create_optimizer(model)


__all__ = [
    "EngramAdamW",
    "EngramTrainer",
    "backbone_optimizer_state_bytes",
    "create_engram_optimizer",
    "engram_parameter_groups",
    "engram_tables",
    "register_sparse_grad_norm",
    "set_sparse_table_grads",
    "table_optimizer_state_bytes",
]
