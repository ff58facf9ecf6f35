"""Sharing Engram models on the Hub: the code files a checkpoint exports, the model card, and push_to_hub.

A helper of the package, not part of a model: nothing in the exported code imports this module, and a model loaded
with `trust_remote_code=True` works without it.
"""

import ast
import importlib.resources
import re
import tempfile
import warnings
from pathlib import Path

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError

CARD_TEMPLATE = "model_card_template.md"
CARD_METADATA = {"library_name": "transformers", "pipeline_tag": "text-generation"}
CARD_TAGS = ["engram", "conditional-memory"]
# transformers' push_to_hub writes this placeholder card into a repo that has none; an Engram push replaces it.
PLACEHOLDER_CARD_MARKER = "This model card has been automatically generated."


def _same_folder_imports(module_file: Path) -> list[str]:
    """Modules a file imports from its own folder, as `from .module import name` (transformers' export syntax)."""
    found = []
    for node in ast.walk(ast.parse(module_file.read_text(encoding="utf-8"), filename=str(module_file))):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        where = f"{module_file.name}:{node.lineno}"
        if node.level > 1 or node.module is None or "." in node.module:
            raise ValueError(
                f"{where}: exported model code may import its own folder only as `from .module import name`; "
                "transformers' save_pretrained and trust_remote_code follow no other form, so the file would be missing."
            )
        if not (module_file.parent / f"{node.module}.py").is_file():
            raise ValueError(f"{where}: imports .{node.module}, but {node.module}.py is not in {module_file.parent}.")
        found.append(node.module)
    return found


def exported_code_files(modeling_file: str | Path | None = None) -> list[str]:
    """File names that `save_pretrained` exports with a model and `trust_remote_code=True` runs.

    The modeling file and, recursively, every module it imports from its own folder (imports inside `try` blocks
    included): exactly the closure transformers copies. Raises `ValueError` on an import form transformers would miss.
    """
    if modeling_file is None:
        from . import modeling_engram

        modeling_file = modeling_engram.__file__
    modeling_file = Path(modeling_file)
    names, pending = [], [modeling_file.stem]
    while pending:
        name = pending.pop(0)
        if name not in names:
            names.append(name)
            pending += _same_folder_imports(modeling_file.parent / f"{name}.py")
    return [f"{name}.py" for name in names]


def card_template() -> str:
    """The Jinja source of the model card: the repository's top-level `model_card_template.md`, which a wheel
    carries inside this package (setup.py) and a source checkout or editable install reads in place."""
    packaged = importlib.resources.files(__package__).joinpath(CARD_TEMPLATE)
    source = Path(__file__).resolve().parents[1] / CARD_TEMPLATE
    return (packaged if packaged.is_file() else source).read_text(encoding="utf-8")


def _thousands(value: int) -> str:
    return f"{value:,}"


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:,.1f} {unit} ({num_bytes:,} bytes)"
    return f"{num_bytes:,} bytes"


def _table_dtype(config, model) -> torch.dtype:
    if model is not None:
        return model.dtype
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def base_model_repo_id(config) -> str | None:
    """The Hub repo id a retrofitted model was made from (`engram_base_model`), for the card's `base_model`; None for
    a model trained from scratch or made from a local folder (the Hub accepts repo ids only there)."""
    name = (getattr(config, "engram_base_model", None) or {}).get("name_or_path") or ""
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def _eval_result(result: EvalResult | dict) -> EvalResult:
    if isinstance(result, EvalResult):
        return result
    result = {"task_type": "text-generation", **result}
    result.setdefault("dataset_type", result.get("dataset_name"))
    return EvalResult(**result)


def model_card(
    model_or_config,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    training_data: str | None = None,
    eval_results: list[EvalResult | dict] | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The Engram model card of a model (or its config), rendered from `model_card_template.md`.

    Args:
        model_or_config: an Engram model (parameter count and dtype come from it) or an `EngramConfig`.
        repo_id: the Hub repo the card shows in its loading snippets (default `<namespace>/<model_name>`).
        model_name: the card's title (default: the repo name, else "engram-model").
        license: card metadata.
        datasets: card metadata: Hub dataset ids, also listed under "Training data".
        training_data: free text for the "Training data" section.
        eval_results: `huggingface_hub.EvalResult`s, or dicts of its fields (`dataset_name`, `metric_type`,
            `metric_value`, optional `dataset_split`, `metric_name`; `task_type` defaults to text-generation);
            they fill the "Evaluation results" table and the card's `model-index`.
        tags: tags besides "engram" and "conditional-memory".

    Save it with `.save(path)`; `str(card)` is the README text.
    """
    import jinja2

    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
    config = model.config if model is not None else model_or_config
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else "engram-model")
    results = [_eval_result(r) for r in eval_results or []]
    card_data = ModelCardData(
        **CARD_METADATA,
        tags=CARD_TAGS + [t for t in tags or [] if t not in CARD_TAGS],
        license=license,
        datasets=datasets,
        base_model=base_model_repo_id(config),
        model_name=model_name if results else None,
        eval_results=results or None,
    )

    dtype = _table_dtype(config, model)
    row_bytes = config.n_embed_per_ngram // config.n_head_per_ngram * torch.empty((), dtype=dtype).element_size()
    orders = list(range(2, config.max_ngram_size + 1))
    engram_layers = []
    for layer_id, sizes in zip(config.engram_layer_ids, config.engram_table_sizes):
        heads = config.n_head_per_ngram
        by_order = [{"n": n, "sizes": sizes[i * heads : (i + 1) * heads]} for i, n in enumerate(orders)]
        engram_layers.append({"layer_id": layer_id, "rows": sum(sizes), "bytes": sum(sizes) * row_bytes,
                              "orders": by_order})
    table_rows = sum(layer["rows"] for layer in engram_layers)
    table_parameters = table_rows * (config.n_embed_per_ngram // config.n_head_per_ngram)

    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                     keep_trailing_newline=True)
    environment.filters.update(thousands=_thousands, size=_size)
    text = environment.from_string(card_template()).render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=repo_id or f"<namespace>/{model_name}",
        config=config,
        parameters=model.num_parameters() if model is not None else None,
        table_parameters=table_parameters,
        orders=orders,
        engram_dim=config.engram_dim,
        table_rows=table_rows,
        table_rows_per_layer=table_rows // len(engram_layers),
        table_bytes=table_rows * row_bytes,
        table_dtype=str(dtype).removeprefix("torch."),
        reduction_percent=100 * (1 - config.engram_compressed_vocab_size / config.vocab_size),
        engram_layers=engram_layers,
        code_files=exported_code_files(),
        training_data=training_data,
        datasets=[datasets] if isinstance(datasets, str) else datasets,
        eval_results=results,
    )
    return ModelCard(text)


def keep_card_body(card: ModelCard, tags: list[str] | None = None) -> ModelCard:
    """An existing card with its body untouched; its metadata gains what an Engram card must carry, if missing."""
    for key, value in CARD_METADATA.items():
        if getattr(card.data, key, None) is None:
            setattr(card.data, key, value)
    card.data.tags = list(card.data.tags or [])
    card.data.tags += [t for t in CARD_TAGS + list(tags or []) if t not in card.data.tags]
    return card


def _hub_card(api: HfApi, repo_id: str, revision: str | None) -> ModelCard | None:
    try:
        path = api.hf_hub_download(repo_id, "README.md", revision=revision)
    except EntryNotFoundError:
        return None
    card = ModelCard(Path(path).read_text(encoding="utf-8"))
    return None if PLACEHOLDER_CARD_MARKER in card.text else card


def push_to_hub(
    model,
    repo_id: str,
    *,
    tokenizer=None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    overwrite_card: bool = False,
    **card_options,
):
    """Push an Engram model (and its tokenizer) with its model card, in one commit; `model.push_to_hub` calls this.

    The commit holds what `save_pretrained` writes (config.json with its `auto_map`, the exported code files,
    model.safetensors, generation_config.json), the tokenizer's files when a tokenizer is given, and README.md:
    rendered from the Engram template (see `model_card` for `card_options`) when the repo has no card yet or only
    transformers' placeholder card, and otherwise the repo's card with its body kept (metadata completed), unless
    `overwrite_card=True`. The other arguments are those of transformers' `push_to_hub`. Returns the `CommitInfo`.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    tags = list(dict.fromkeys([*(getattr(model, "model_tags", None) or []), *(tags or [])]))
    card = None if overwrite_card else _hub_card(api, repo_id, revision)
    if card is None:
        card = model_card(model, repo_id=repo_id, tags=tags, **card_options)
    else:
        if card_options:
            warnings.warn(
                f"{repo_id} already has a model card, whose body is kept; {sorted(card_options)} are not used. "
                "Pass overwrite_card=True to render a new card.", stacklevel=2,
            )
        card = keep_card_body(card, tags)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        card.save(Path(folder) / "README.md")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or ("Upload Engram model and tokenizer" if tokenizer else "Upload Engram model"),
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


__all__ = ["exported_code_files", "model_card", "keep_card_body", "push_to_hub", "card_template"]
