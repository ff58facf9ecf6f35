"""Checkpoints of a run with row-sharded tables that resume on any number of ranks (torch.distributed.checkpoint).

A checkpoint is one DCP folder (`STATE_DIR`) of model and optimizer state, which every rank writes its part of and
which loads onto any world size: DCP reshards whatever it saves as DTensors. FSDP2's parameters and their Adam
moments are DTensors already (`get_model_state_dict` / `get_optimizer_state_dict`); replicated parameters are saved
once. The row shards of the Engram tables stay plain parameters while training (DTensor has no sparse gradients, and
the lazy Adam steps only the rows a batch touched), so they and their moments become `Shard(0)` DTensors in the state
dict only: `table_parallel.row_blocks` cuts `torch.chunk`'s blocks, DTensor's own layout, and the DTensors wrap the
shards' own memory (nothing is copied to save, and loading writes into the shards).

Beside the state, `RUN_FILE` records what it must fit before anything is read: the digests of the Engram config
(hash and table layout, `table_parallel.engram_config_digests`), the world size and the global batch.
"""

import glob
import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .memory import EngramTable
from .table_parallel import engram_config_digests, sharded_tables

STATE_DIR = "engram_state"  # in a Trainer checkpoint folder
RUN_FILE = "engram_run.json"  # in STATE_DIR
FORMAT = 1


def _table_entries(model: nn.Module) -> dict[str, EngramTable]:
    """The state-dict keys of the tables' row-sharded tensors (weights, FP8 scales), each with its table."""
    entries = {}
    for name, table in sharded_tables(model).items():
        name = name.replace("_checkpoint_wrapped_module.", "")  # as get_model_state_dict names parameters
        entries[f"{name}.weight"] = table
        if table.weight_scale is not None:
            entries[f"{name}.weight_scale"] = table
    return entries


def _as_dtensor(local: torch.Tensor, table: EngramTable) -> DTensor:
    """The rank's rows `local` as the `Shard(0)` DTensor of the whole table, over the table's process group."""
    storage = table.storage
    mesh = DeviceMesh.from_group(storage.group, local.device.type)
    shape = (table.num_embeddings, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def model_state(model: nn.Module) -> dict:
    """`get_model_state_dict(model)` with the table shards as `Shard(0)` DTensors."""
    state = get_model_state_dict(model)
    for key, table in _table_entries(model).items():
        state[key] = _as_dtensor(state[key], table)
    return state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`get_optimizer_state_dict(model, optimizer)` with the tables' Adam moments as `Shard(0)` DTensors."""
    state = get_optimizer_state_dict(model, optimizer)
    for key, table in _table_entries(model).items():
        if key in state["state"]:  # a new dict: the optimizer's own per-parameter dict may be the one returned
            state["state"][key] = {  # the moments, not the step count
                name: _as_dtensor(value, table) if getattr(value, "shape", None) == table.weight.shape else value
                for name, value in state["state"][key].items()
            }
    return state


def _table_locals(model: nn.Module, state: dict) -> dict:
    """`state` (a model state, or an optimizer's "state") with the tables' DTensors back to their local tensors, the
    plain parameters (and their moments) that `set_model_state_dict` / `set_optimizer_state_dict` load."""
    for key in _table_entries(model):
        if isinstance(state.get(key), DTensor):
            state[key] = state[key].to_local()
        elif isinstance(state.get(key), dict):
            state[key] = {name: value.to_local() if isinstance(value, DTensor) else value
                          for name, value in state[key].items()}
    return state


def save_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str, global_batch: int) -> None:
    """Save model and optimizer state into `folder/STATE_DIR` (collective: every rank writes its part)."""
    path = os.path.join(folder, STATE_DIR)
    dcp.save({"model": model_state(model), "optimizer": optimizer_state(model, optimizer)}, checkpoint_id=path)
    if dist.get_rank() == 0:
        run = {"format": FORMAT, "engram": engram_config_digests(model), "world_size": dist.get_world_size(),
               "global_batch": global_batch}
        with open(os.path.join(path, RUN_FILE), "w") as handle:
            json.dump(run, handle, indent=1)
    dist.barrier()


def check_resumable(model: nn.Module, folder: str, global_batch: int, allow_global_batch_change: bool = False) -> dict:
    """Raise a ValueError (on every rank: each reads the same file, no collective) unless `folder` holds a
    checkpoint of this module's format whose Engram config is `model`'s and whose global batch is `global_batch`
    (unless `allow_global_batch_change`). Returns the checkpoint's run record."""
    path = os.path.join(folder, STATE_DIR, RUN_FILE)
    if not os.path.isfile(path):
        if glob.glob(os.path.join(folder, "optimizer-rank*-of-*.pt")):
            raise ValueError(
                f"checkpoint {folder} holds per-rank optimizer files (optimizer-rank*-of-*.pt) of an earlier "
                f"modeling_engram, whose row blocks this version no longer cuts. Resume it with that version, or start "
                f"a new run from its model (from_pretrained({folder!r}) loads on any number of ranks), whose "
                f"checkpoints ({STATE_DIR}/) resume on any number of ranks."
            )
        raise ValueError(f"checkpoint {folder} has no {STATE_DIR}/{RUN_FILE}: it was not written by a run with "
                         "sharded Engram tables (EngramTrainer with shard_tables or FSDP2).")
    with open(path) as handle:
        run = json.load(handle)
    mine = engram_config_digests(model)
    differing = [name for name in mine if run["engram"].get(name) != mine[name]]
    if differing:
        raise ValueError(f"checkpoint {folder} was written by a model with another Engram config "
                         f"({', '.join(differing)} differ): resume with the model the run started from.")
    if run["global_batch"] != global_batch and not allow_global_batch_change:
        raise ValueError(
            f"checkpoint {folder} was trained with a global batch of {run['global_batch']} sequences per step "
            f"({run['world_size']} ranks); this run's is {global_batch}. Per-device batch x gradient accumulation x "
            "ranks must stay the same for the run to continue as it would have; pass allow_global_batch_change=True "
            "to resume with another on purpose."
        )
    return run


def load_model_state(model: nn.Module, folder: str) -> None:
    """Load the model state of `folder/STATE_DIR` into `model` (sharded on any number of ranks; collective)."""
    state = {"model": model_state(model)}
    dcp.load(state, checkpoint_id=os.path.join(folder, STATE_DIR))
    set_model_state_dict(model, _table_locals(model, state["model"]))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    """Load the optimizer state of `folder/STATE_DIR` into `optimizer` (built on `model`; collective)."""
    state = {"optimizer": optimizer_state(model, optimizer)}
    dcp.load(state, checkpoint_id=os.path.join(folder, STATE_DIR))
    state["optimizer"]["state"] = _table_locals(model, state["optimizer"]["state"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


__all__ = ["check_resumable", "load_model_state", "load_optimizer_state", "save_training_state"]
