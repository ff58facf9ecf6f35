"""Device maps for Engram models: where the backbone runs and where the (huge, sparse) tables live.

Accelerate treats every parameter alike: a table mapped to "cpu"/"disk" behind an accelerator gets an offload
hook that copies the whole table to the accelerator on every forward, and `device_map="auto"` pushes every layer
after a huge one to the CPU. Engram tables only ever need their gathered rows, so they are kept out of
Accelerate entirely: a table placement in a device map becomes `engram_storage` ("cpu" -> "host", "disk" ->
"disk"), the table entries are removed from the map given to transformers, and the tables are read from the
checkpoint by `memory.attach_checkpoint_tables` once the backbone is loaded and dispatched.
"""

import re

import torch
from transformers import PreTrainedConfig

_TABLE = re.compile(r"^(?:model\.)?layers\.(\d+)\.engram\.table$")
_STORAGE_OF = {"cpu": "host", "disk": "disk"}


def _bytes(value) -> int:
    from accelerate.utils import convert_file_size_to_int

    return value if isinstance(value, int) else convert_file_size_to_int(value)


def _meta_model(model_or_config, model_class=None):
    """The model itself, or one built on the meta device from a config (no memory)."""
    if not isinstance(model_or_config, PreTrainedConfig):
        return model_or_config
    with torch.device("meta"):
        if model_class is not None:
            return model_class(model_or_config)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(model_or_config)


def _block_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "model" and len(parts) > 1:
        parts = parts[1:]
        prefix = "model."
    else:
        prefix = ""
    depth = 2 if parts[0] == "layers" else 1
    return prefix + ".".join(parts[:depth])


def engram_device_map(
    model_or_config,
    tables: str | int | torch.device = "auto",
    device: str | int | torch.device | None = None,
    max_memory: dict | None = None,
    model_class=None,
) -> dict[str, str | int]:
    """An explicit device map: backbone blocks on `device` (spilling in order to "cpu", then "disk", only when
    `max_memory` says they do not fit), and every Engram table at `tables`.

    Args:
        model_or_config: an `EngramConfig` or an Engram model (meta tensors are fine).
        tables: "cpu" (host memory), "disk" (memory-mapped checkpoint), a device, or "auto": on `device` if
            everything fits there, else "cpu" if the tables fit in the CPU budget, else "disk".
        device: execution device of the backbone (default: "cuda:0" when available, else "cpu").
        max_memory: per-device budgets as for `from_pretrained`, e.g. `{0: "20GiB", "cpu": "64GiB"}`.
        model_class: the class to size from a config (default: what `AutoModelForCausalLM` maps it to).
    """
    if device is None:
        device = 0 if torch.cuda.is_available() else "cpu"
    model = _meta_model(model_or_config, model_class)
    budgets = {key: _bytes(value) for key, value in (max_memory or {}).items()}
    sizes: dict[str, int] = {}
    table_sizes: dict[str, int] = {}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, param in tensors:
        module = name.rsplit(".", 1)[0]
        nbytes = param.numel() * param.element_size()
        if _TABLE.match(module) and name.endswith(".weight"):
            table_sizes[module] = nbytes
        else:
            sizes[_block_of(name)] = sizes.get(_block_of(name), 0) + nbytes

    device_map, used = {}, {}
    order = [device, "cpu", "disk"] if device != "cpu" else ["cpu", "disk"]
    current = 0
    for block, nbytes in sizes.items():
        while order[current] != "disk" and used.get(order[current], 0) + nbytes > budgets.get(
            order[current], float("inf")
        ):
            current += 1
        device_map[block] = order[current]
        used[order[current]] = used.get(order[current], 0) + nbytes

    if tables == "auto":
        total = sum(table_sizes.values())

        def fits(where) -> bool:
            return used.get(where, 0) + total <= budgets.get(where, float("inf"))

        tables = device if fits(device) else "cpu" if fits("cpu") else "disk"
    for module in table_sizes:
        device_map[module] = tables
    return device_map


def resolve_table_placement(cls, args: tuple, kwargs: dict) -> dict:
    """Turn table entries of `device_map` (or `device_map="auto"`) into `engram_storage` for `from_pretrained`."""
    device_map = kwargs.get("device_map")
    if device_map is None:
        return kwargs
    kwargs = dict(kwargs)
    config = kwargs.get("config")
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        if not isinstance(config, PreTrainedConfig):
            hub_keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            config = cls.config_class.from_pretrained(args[0], **{k: kwargs[k] for k in hub_keys if k in kwargs})
        device_map = engram_device_map(
            config, tables="auto", max_memory=kwargs.pop("max_memory", None), model_class=cls
        )
    if not isinstance(device_map, dict):
        return kwargs
    placements = {key: value for key, value in device_map.items() if _TABLE.match(key)}
    if not placements:
        return kwargs
    distinct = set(map(str, placements.values()))
    if len(distinct) > 1:
        raise ValueError(f"all Engram tables must share one placement; the device map gives {sorted(distinct)}.")
    placement = next(iter(placements.values()))
    storage = _STORAGE_OF.get(placement, "device")
    if storage != "device":
        device_map = {k: v for k, v in device_map.items() if k not in placements}
    kwargs["device_map"] = device_map
    if isinstance(config, PreTrainedConfig):
        config.engram_storage = storage
    else:
        kwargs["engram_storage"] = storage
    return kwargs


__all__ = ["engram_device_map"]
