"""Padding-free packing (transformers' DataCollatorWithFlattening, TRL's padding_free): documents concatenated into one
row, their boundaries given as restarting `position_ids`, as `cu_seq_lens_*` keywords, as `seq_idx`, or together. No n-gram and no
short-conv tap reaches into the previous document, so a packed row equals its documents run one by one."""

import pytest
import torch
from conftest import require, tiny_model
from transformers import DataCollatorWithFlattening

LENGTHS = [5, 9, 3, 7]  # around the conv state (9) and the token history (2)


def documents(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=generator) for n in LENGTHS]


def packed(docs: list[torch.Tensor], boundaries: str) -> dict:
    ids = torch.cat(docs).unsqueeze(0)
    starts = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32)
    batch = {"input_ids": ids}
    if boundaries in ("position_ids", "both"):
        batch["position_ids"] = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    if boundaries in ("cu_seq_lens", "both"):
        batch.update(cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    if boundaries in ("seq_idx", "both"):  # DataCollatorWithFlattening(return_seq_idx=True)
        batch["seq_idx"] = torch.cat([torch.full((len(d),), i, dtype=torch.int32) for i, d in enumerate(docs)])[None]
    return batch


@torch.no_grad()
@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seq_lens", "seq_idx", "both"])
def test_a_packed_row_equals_its_documents_one_by_one(hc_model, boundaries):
    docs = documents()
    alone = torch.cat([hc_model(doc.unsqueeze(0)).logits for doc in docs], dim=1)
    torch.testing.assert_close(hc_model(**packed(docs, boundaries)).logits, alone, atol=1e-5, rtol=0)


@torch.no_grad()
def test_without_boundaries_the_documents_would_mix():
    """Guard: the same row without boundaries differs, so the test above can fail."""
    model, docs = tiny_model(), documents()
    alone = torch.cat([model(doc.unsqueeze(0)).logits for doc in docs], dim=1)
    assert (model(torch.cat(docs).unsqueeze(0)).logits - alone).abs().max() > 1e-3


def test_cu_seq_lens_that_do_not_describe_the_row_are_a_clear_error():
    batch = packed(documents(), "cu_seq_lens")
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_q"][:-1]
    with pytest.raises(ValueError, match="cu_seq_lens_q ends at 17, but packed input_ids must be one row"):
        tiny_model()(**batch)


@pytest.mark.parametrize("boundaries", ["cu_seq_lens", "seq_idx"])
def test_position_ids_that_disagree_with_the_boundaries_are_a_clear_error(boundaries):
    batch = packed(documents(), boundaries)
    batch["position_ids"] = torch.arange(sum(LENGTHS))[None]
    with pytest.raises(ValueError, match="position_ids do not restart where .* starts a new document"):
        tiny_model()(**batch)


def test_one_trainer_step_on_a_flattened_batch_equals_the_padded_step(tmp_path):
    require("datasets")
    from datasets import Dataset
    from transformers import TrainingArguments

    from modeling_engram import EngramTrainer

    rows = [{"input_ids": doc.tolist(), "labels": doc.tolist()} for doc in documents(seed=1)]
    longest = max(LENGTHS)

    def padded(features):
        pad = lambda values, fill: [*values, *[fill] * (longest - len(values))]  # noqa: E731
        return {
            "input_ids": torch.tensor([pad(f["input_ids"], 0) for f in features]),
            "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
            "labels": torch.tensor([pad(f["labels"], -100) for f in features]),
        }

    # SGD: Adam's first step is lr * sign(g), which turns float noise in near-zero gradients into whole steps.
    collators = {"padded": padded, "flattened": DataCollatorWithFlattening(return_flash_attn_kwargs=True)}
    results = {}
    for name, collator in collators.items():
        model = tiny_model().train()
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=4,
                                 learning_rate=1e-2, optim="sgd", logging_steps=1, save_strategy="no", report_to=[],
                                 disable_tqdm=True, use_cpu=True, seed=0, remove_unused_columns=False)
        trainer = EngramTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator)
        trainer.train()
        results[name] = (trainer.state.log_history[0]["loss"], {k: v.detach().clone() for k, v in model.state_dict().items()})
    (padded_loss, padded_state), (flat_loss, flat_state) = results["padded"], results["flattened"]
    assert flat_loss == pytest.approx(padded_loss, abs=1e-5)
    for key, value in padded_state.items():
        torch.testing.assert_close(flat_state[key], value, atol=1e-6, rtol=1e-5, msg=key)
