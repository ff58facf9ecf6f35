"""The compact form of a retrofitted model: only its Engram tensors and config, over a base model it names.

`save_engram_adapter(model, folder)` / `push_engram_adapter(model, repo_id)` write `engram_adapter_config.json` (the
config, whose `engram_base_model` records the base's name or path, architecture and a fingerprint of its weights) and
`engram_adapter.safetensors` (the Engram tensors alone); `from_engram_adapter(folder_or_repo, base=None)` (also
`EngramForCausalLM.from_engram_adapter`) loads them over the base, by default the recorded one, and refuses a base
whose architecture, backbone config or weights differ. A memory for a public base model is shared without
re-uploading the base; the PEFT-adapter idea, for Engram's tensors.
"""

import json
from pathlib import Path

import torch

from .configuration_engram import EngramConfig
from .hub import base_model_repo_id
from .modeling_engram import EngramForCausalLM
from .retrofit import (backbone_fields, base_fingerprint, build_over_base, check_base_model, is_engram_key,
                       load_base_model)

ADAPTER_CONFIG_NAME = "engram_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "engram_adapter.safetensors"


def engram_state_dict(model: EngramForCausalLM) -> dict[str, torch.Tensor]:
    """Only the Engram tensors of a model's state dict (what the compact adapter holds)."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_engram_key(name)}


def save_engram_adapter(model: EngramForCausalLM, save_directory: str | Path) -> Path:
    """Write the compact form: `engram_adapter_config.json` (the config, with the base model it was made over) and
    `engram_adapter.safetensors` (the Engram tensors only). Returns the folder."""
    from safetensors.torch import save_file

    if model.config.engram_base_model is None:
        raise ValueError("save_engram_adapter needs a retrofitted model (from_base_model); use save_pretrained.")
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / ADAPTER_CONFIG_NAME)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in engram_state_dict(model).items()}
    save_file(tensors, folder / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    return folder


def _differing_backbone_fields(config: EngramConfig, derived: dict) -> list[str]:
    """'field: adapter value vs base value' for every backbone field where `config` and a base's fields differ."""
    differing = []
    for name, value in derived.items():
        if name == "layer_types":
            have = [config.attention_type(i) for i in range(config.num_hidden_layers)]
        else:
            have = getattr(config, name)
        if have != value:
            differing.append(f"{name}: adapter {have!r}, base {value!r}")
    return differing


def _adapter_file(adapter: str | Path, filename: str, **hub_kwargs) -> Path:
    local = Path(adapter) / filename
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(adapter), filename, **hub_kwargs))


def from_engram_adapter(
    adapter: str | Path,
    base=None,
    *,
    model_class: type[EngramForCausalLM] = EngramForCausalLM,
    revision: str | None = None,
    token: str | bool | None = None,
    **base_kwargs,
) -> EngramForCausalLM:
    """Load a compact Engram adapter (a folder or Hub repo id) over its base model.

    `base`: a loaded model or a path / repo id; default: the one recorded in the adapter. Keywords go to the base's
    `from_pretrained`. Raises a ValueError when the base's architecture, config or weights differ from the adapter's.
    """
    from safetensors.torch import load_file

    hub_kwargs = {"revision": revision, "token": token}
    config = EngramConfig.from_json_file(str(_adapter_file(adapter, ADAPTER_CONFIG_NAME, **hub_kwargs)))
    recorded = config.engram_base_model or {}
    if base is None:
        if not recorded.get("name_or_path"):
            raise ValueError(f"adapter {adapter} records no base model name or path; pass base=.")
        base = recorded["name_or_path"]
        base_kwargs = {**{k: recorded[k] for k in ("gguf_file", "revision", "subfolder") if k in recorded},
                       **base_kwargs}
    base, _, _ = load_base_model(base, load_tokenizer=False, **base_kwargs)
    check_base_model(base)
    if recorded.get("architecture", type(base).__name__) != type(base).__name__:
        raise ValueError(
            f"adapter {adapter} was made over a {recorded['architecture']}; the base given is a {type(base).__name__}."
        )
    differing = _differing_backbone_fields(config, backbone_fields(base.config))
    if differing:
        raise ValueError(f"adapter {adapter} was made over another backbone: {'; '.join(differing)}.")
    model = build_over_base(base, config, model_class)
    expected = engram_state_dict(model)
    tensors = load_file(str(_adapter_file(adapter, ADAPTER_WEIGHTS_NAME, **hub_kwargs)))
    if tensors.keys() != expected.keys():
        raise ValueError(
            f"adapter {adapter} holds tensors {sorted(tensors.keys() ^ expected.keys())[:5]} that do not match its "
            "config's Engram layers."
        )
    model.load_state_dict(tensors, strict=False)
    model.base_model.hasher.check_token_map()
    fingerprint = torch.tensor(base_fingerprint(model))
    if recorded.get("fingerprint") and not torch.allclose(
        fingerprint, torch.tensor(recorded["fingerprint"]), rtol=1e-2, atol=1e-3
    ):
        raise ValueError(
            f"the base model's weights differ from those adapter {adapter} was trained over "
            f"({recorded.get('name_or_path')!r}, {recorded.get('architecture')}): its memory would not fit them."
        )
    return model


def push_engram_adapter(
    model: EngramForCausalLM,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload Engram adapter",
    revision: str | None = None,
) -> str:
    """Push the compact form to the Hub: one commit, with a model card naming the base model. Returns the commit."""
    import tempfile

    from huggingface_hub import HfApi, ModelCard, ModelCardData

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    recorded = model.config.engram_base_model or {}
    with tempfile.TemporaryDirectory() as folder:
        save_engram_adapter(model, folder)
        data = ModelCardData(library_name="transformers", tags=["engram", "conditional-memory", "engram-adapter"],
                             base_model=base_model_repo_id(model.config))
        card = ModelCard.from_template(
            data, template_str=ADAPTER_CARD, repo_id=repo_id, base=json.dumps(recorded.get("name_or_path")),
            layers=model.config.engram_layer_ids,
        )
        card.save(Path(folder) / "README.md")
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                   revision=revision)
    return str(commit)


ADAPTER_CARD = """---
{{ card_data }}
---

# {{ repo_id }}

An Engram memory (conditional memory, Cheng et al. 2026) at layers {{ layers }} for the base model {{ base }}:
only the Engram tensors and their config, loaded over the base model with
[modeling_engram](https://pypi.org/project/modeling-engram/):

```python
from modeling_engram import EngramForCausalLM

model = EngramForCausalLM.from_engram_adapter("{{ repo_id }}")   # loads the base model it names, checks it fits
```
"""


__all__ = ["engram_state_dict", "from_engram_adapter", "push_engram_adapter", "save_engram_adapter"]
