"""The paper's optimizer recipe, sparse (lazy) table updates, gradient norms, and training under Trainer."""

import copy
import math

import pytest
import torch
from conftest import tiny_model, write_text_files
from torch import nn
from transformers import (AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments,
                          get_cosine_schedule_with_warmup)

from modeling_engram import EngramTrainer, create_engram_optimizer, text_blocks_dataset
from modeling_engram.table_parallel import RowShardedStorage, row_blocks
from modeling_engram.training import EngramAdamW, engram_parameter_groups, table_optimizer_state_bytes


def ids(batch=2, length=11, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def tables(model):
    return {layer_id: model.model.layers[layer_id].engram.table for layer_id in model.config.engram_layer_ids}


def test_parameter_groups_follow_the_paper_recipe():
    model = tiny_model(hc_mult=4)
    optimizer = create_engram_optimizer(model, lr=1e-3, weight_decay=0.1)
    groups = {group["name"]: group for group in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {name: {names[id(p)] for p in group["params"]} for name, group in groups.items()}

    assert grouped["engram_tables"] == {"model.layers.0.engram.table.weight", "model.layers.2.engram.table.weight"}
    assert (groups["engram_tables"]["lr"], groups["engram_tables"]["weight_decay"]) == (5e-3, 0.0)
    assert (groups["decay"]["lr"], groups["decay"]["weight_decay"]) == (1e-3, 0.1)
    assert (groups["no_decay"]["lr"], groups["no_decay"]["weight_decay"]) == (1e-3, 0.0)
    for name in ("engram.kv_proj.key_proj.weight", "engram.kv_proj.value_proj.weight", "engram.short_conv.weight",
                 "self_attn.q_proj.weight", "mlp.down_proj.weight"):
        assert f"model.layers.2.{name}" in grouped["decay"]
    for name in ("engram.query_norm.weight", "engram.key_norm.weight", "engram.conv_norm.weight", "input_layernorm.weight"):
        assert f"model.layers.2.{name}" in grouped["no_decay"]
    assert "model.norm.weight" in grouped["no_decay"]
    every = [n for group in grouped.values() for n in group]
    assert sorted(every) == sorted(names.values())  # each trainable parameter in exactly one group
    assert all(table.sparse for table in tables(model).values())
    assert create_engram_optimizer(model, lr=1e-3, table_lr_multiplier=2.0).param_groups[-1]["lr"] == 2e-3
    with pytest.raises(ValueError, match="table_lr_multiplier=0 is invalid"):
        create_engram_optimizer(model, table_lr_multiplier=0)


def test_sparse_lazy_adam_equals_torch_adamw_when_each_step_gathers_the_same_rows():
    """Same batch every step: untouched rows have zero gradients in dense AdamW too, so both must agree."""
    model = tiny_model()
    reference = copy.deepcopy(model)
    optimizer = create_engram_optimizer(model, lr=1e-2, weight_decay=0.1)
    reference_optimizer = torch.optim.AdamW(engram_parameter_groups(reference, 1e-2, 0.1), lr=1e-2)
    batch = ids()
    for _ in range(4):
        norms = []
        for net, opt in ((model, optimizer), (reference, reference_optimizer)):
            net(batch, labels=batch).loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5))  # clips: the norm is about 2
            opt.step()
            opt.zero_grad()
        assert norms[0] > 0.5
        torch.testing.assert_close(norms[0], norms[1], atol=1e-6, rtol=1e-6)
    assert all(table.sparse for table in tables(model).values())
    assert not any(table.sparse for table in tables(reference).values())
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param, expected, atol=1e-6, rtol=1e-5, msg=name)


def test_rows_never_gathered_keep_their_values_and_zero_moments():
    model = tiny_model()
    optimizer = create_engram_optimizer(model, lr=1e-2)
    before = {layer_id: table.weight.detach().clone() for layer_id, table in tables(model).items()}
    gathered = {layer_id: torch.zeros(table.weight.shape[0], dtype=torch.bool) for layer_id, table in tables(model).items()}
    learned = copy.deepcopy(gathered)  # gathered before the last position, whose output no loss term reads
    for step in range(3):
        batch = ids(batch=1, length=8, seed=step)
        for layer_id, hash_ids in model.model.hasher(batch).items():
            rows = hash_ids + tables(model)[layer_id].offsets
            gathered[layer_id][rows.flatten()] = True
            learned[layer_id][rows[:, :-1].flatten()] = True
        model(batch, labels=batch).loss.backward()
        for table in tables(model).values():
            assert table.weight.grad.is_sparse
        optimizer.step()
        optimizer.zero_grad()
    for layer_id, table in tables(model).items():
        rows = gathered[layer_id]
        assert 0 < rows.sum() < rows.numel()
        assert torch.equal(table.weight[~rows], before[layer_id][~rows])
        moved = learned[layer_id]
        assert (table.weight[moved] != before[layer_id][moved]).any(dim=1).all()
        state = optimizer.state[table.weight]
        assert torch.count_nonzero(state["exp_avg"][~rows]) == 0 and torch.count_nonzero(state["exp_avg_sq"][~rows]) == 0
        assert (state["exp_avg_sq"][moved] > 0).any(dim=1).all()


def test_host_tables_train_sparsely_like_device_tables(tmp_path):
    """engram_storage="host" (deduplicated gather, background prefetch) gets the same sparse updates."""
    tiny_model().save_pretrained(tmp_path)
    runs = {}
    for storage in ("device", "host"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", engram_storage=storage)
        optimizer = create_engram_optimizer(model.train(), lr=1e-2, weight_decay=0.1)
        for step in range(3):
            batch = ids(seed=step)
            model(batch, labels=batch).loss.backward()
            assert all(table.weight.grad.is_sparse for table in tables(model).values())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad()
        runs[storage] = model
    assert all(table.storage.name == "host" for table in tables(runs["host"]).values())
    # The host gather sums duplicate rows' gradients in another order (deduplicated ids); Adam normalises the
    # resulting 1e-9-scale differences of near-zero gradients into updates of up to ~4e-5 after three steps at lr 1e-2.
    for (name, param), expected in zip(runs["host"].named_parameters(), runs["device"].parameters()):
        torch.testing.assert_close(param, expected, atol=1e-4, rtol=1e-5, msg=name)


def test_lazy_adam_rows_match_a_hand_computation():
    """Row 1 gathered twice at step 1 (gradients summed), then idle; row 3 at both steps; others never."""
    table = nn.Embedding(5, 2, sparse=True)
    start = table.weight.detach().clone().double()
    optimizer = EngramAdamW([table.weight], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    coefficients = [torch.tensor([[1.0, -2.0], [0.5, 0.5], [3.0, 1.0]]), torch.tensor([[-1.0, 2.0]])]
    for rows, coefficient in zip([torch.tensor([1, 1, 3]), torch.tensor([3])], coefficients):
        (table(rows) * coefficient).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    def adam(grads):
        value, m, v = (torch.zeros(2, dtype=torch.double) for _ in range(3))
        for step, grad in grads:
            m, v = 0.9 * m + 0.1 * grad, 0.99 * v + 0.01 * grad**2
            value = value - 0.1 / (1 - 0.9**step) * m / ((v / (1 - 0.99**step)).sqrt() + 1e-8)
        return value

    expected = start.clone()
    expected[1] += adam([(1, coefficients[0][0].double() + coefficients[0][1].double())])
    expected[3] += adam([(1, coefficients[0][2].double()), (2, coefficients[1][0].double())])
    torch.testing.assert_close(table.weight.detach().double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(table.weight.detach()[[0, 2, 4]], start[[0, 2, 4]].float())


def test_sparse_gradients_need_zero_weight_decay():
    table = nn.Embedding(5, 2, sparse=True)
    optimizer = EngramAdamW([table.weight], weight_decay=0.1)
    table(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="weight_decay=0.1 on a parameter with sparse gradients"):
        optimizer.step()


@pytest.mark.parametrize("ord", [2.0, 1.0, math.inf])
def test_gradient_norms_and_clipping_treat_sparse_tables_like_dense_ones(ord):
    create_engram_optimizer(tiny_model())  # registers the sparse norm kernel
    indices = torch.tensor([[4, 1, 4, 0]])  # row 4 twice: the norm is the norm of the summed rows
    values = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    sparse = torch.sparse_coo_tensor(indices, values, (6, 3), check_invariants=True)
    dense = sparse.to_dense()
    torch.testing.assert_close(torch.linalg.vector_norm(sparse, ord), torch.linalg.vector_norm(dense, ord))
    params = [nn.Parameter(torch.zeros(6, 3)), nn.Parameter(torch.zeros(6, 3)), nn.Parameter(torch.zeros(2))]
    params[0].grad, params[1].grad, params[2].grad = sparse.clone(), dense.clone(), torch.ones(2)
    total = torch.nn.utils.clip_grad_norm_(params, 0.1, norm_type=ord)
    norms = [torch.linalg.vector_norm(t, ord) for t in (dense, dense, torch.ones(2))]
    expected = torch.linalg.vector_norm(torch.stack(norms), ord)
    torch.testing.assert_close(total, expected)
    assert params[0].grad.is_sparse
    torch.testing.assert_close(params[0].grad.to_dense(), params[1].grad)
    torch.testing.assert_close(params[1].grad, dense * 0.1 / (expected + 1e-6))


def test_scheduler_drives_tables_and_the_rest_together():
    optimizer = create_engram_optimizer(tiny_model(), lr=1e-3, table_lr_multiplier=5.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=8)
    base_lrs = []
    for _ in range(8):
        lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
        assert lrs["no_decay"] == lrs["decay"]
        assert lrs["engram_tables"] == pytest.approx(5 * lrs["decay"], rel=1e-12)
        base_lrs.append(lrs["decay"])
        optimizer.step()
        scheduler.step()
    assert base_lrs[0] == 0.0 and base_lrs[2] == pytest.approx(1e-3) and base_lrs[-1] < 1e-4


def test_optimizer_state_for_the_tables_is_twice_the_table_bytes():
    model = tiny_model()
    optimizer = create_engram_optimizer(model)
    batch = ids()
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    state, table_bytes = table_optimizer_state_bytes(optimizer, model)
    assert table_bytes == sum(t.weight.numel() * 4 for t in tables(model).values())
    assert state == 2 * table_bytes + 4 * len(tables(model))  # two moments per table, plus its float32 step count


def test_nccl_with_sparse_table_gradients_is_a_clear_error(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match="NCCL has no sparse all-reduce. Shard the tables over the ranks instead"):
        create_engram_optimizer(model)
    create_engram_optimizer(model, sparse_table_grads=False)
    assert not any(table.sparse for table in tables(model).values())
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    create_engram_optimizer(model)  # the tables live on the CPU, which gloo serves
    assert all(table.sparse for table in tables(model).values())
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    for table in tables(model).values():
        # sharded tables (table_parallel.py) are exchanged by all_to_all, never all-reduced
        table.storage = RowShardedStorage(table.storage, row_blocks(table.num_embeddings, 2), 0, group=None)
    create_engram_optimizer(model)


def test_optimizer_after_wrapping_in_ddp_is_a_clear_error(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(tiny_model())
        with pytest.raises(ValueError, match="before wrapping it in DistributedDataParallel"):
            create_engram_optimizer(wrapped)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def text_data(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("text")
    blocks = text_blocks_dataset(write_text_files(folder, count=3), tiny_tokenizer, block_size=24,
                                 cache_dir=folder / "cache")
    return blocks.select(range(48)), blocks.select(range(48, 64))


def training_args(out, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=True, seed=0, per_device_eval_batch_size=8,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


class Recorder(TrainerCallback):
    """Records, before each optimizer step, whether the table gradients are sparse and how many rows they hold."""

    def __init__(self, model):
        self.tables = list(tables(model).values())
        self.sparse, self.rows = [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sparse.append(all(t.weight.grad.is_sparse for t in self.tables))
        if self.sparse[-1]:
            self.rows.append(max(t.weight.grad.coalesce().indices().shape[1] / t.weight.shape[0] for t in self.tables))


def losses(trainer, key="loss"):
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry}


def train(model, args, data, trainer_class=EngramTrainer, **kwargs):
    recorder = Recorder(model)
    trainer = trainer_class(model=model, args=args, train_dataset=data[0], eval_dataset=data[1],
                            callbacks=[recorder], **kwargs)
    trainer.train(resume_from_checkpoint=kwargs.pop("resume", None))
    return trainer, recorder


def test_engram_trainer_resumes_on_the_same_loss_curve(tmp_path, text_data):
    """Accumulation 2, clipping, evaluation and checkpoints; resuming from step 3 reproduces steps 4-6 exactly."""
    args = training_args(tmp_path / "full", save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3)
    full, recorder = train(tiny_model(vocab_size=99), args, text_data)
    assert all(recorder.sparse) and len(recorder.sparse) == 6
    assert max(recorder.rows) < 1.0  # a step's gradient holds part of the table, not all of it
    assert set(losses(full, "eval_loss")) == {3, 6}
    assert min(losses(full, "grad_norm").values()) > 0.5  # the clipping threshold is active

    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "model.safetensors").exists()
    resumed_model = tiny_model(vocab_size=99, seed=1)  # different weights: the checkpoint must restore them
    resumed = EngramTrainer(model=resumed_model, args=training_args(tmp_path / "resumed", eval_strategy="steps",
                                                                     eval_steps=3),
                            train_dataset=text_data[0], eval_dataset=text_data[1])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key in ("loss", "grad_norm", "eval_loss"):
        after = [{step: value for step, value in losses(run, key).items() if step > 3} for run in (resumed, full)]
        assert after[0] == after[1] and len(after[0]) == (3 if key != "eval_loss" else 1), key
    for (name, param), expected in zip(resumed.model.named_parameters(), full.model.named_parameters()):
        assert torch.equal(param, expected[1]), name


def test_plain_trainer_takes_the_engram_optimizer_through_its_optimizers_argument(tmp_path, text_data):
    args = training_args(tmp_path / "engram")
    engram, _ = train(tiny_model(vocab_size=99), args, text_data)
    model = tiny_model(vocab_size=99)
    optimizer = create_engram_optimizer(model, lr=args.learning_rate, weight_decay=args.weight_decay,
                                        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    plain, recorder = train(model, training_args(tmp_path / "plain"), text_data, trainer_class=Trainer,
                            optimizers=(optimizer, None))
    assert all(recorder.sparse)
    assert losses(plain) == losses(engram) and losses(plain, "grad_norm") == losses(engram, "grad_norm")
    assert losses(plain, "learning_rate") == losses(engram, "learning_rate")
    for (name, param), expected in zip(plain.model.named_parameters(), engram.model.parameters()):
        assert torch.equal(param, expected), name


def test_plain_trainer_out_of_the_box_trains_with_dense_tables(tmp_path, text_data):
    model = tiny_model(vocab_size=99)
    start = {layer_id: table.weight.detach().clone() for layer_id, table in tables(model).items()}
    trainer, recorder = train(model, training_args(tmp_path, max_steps=8, learning_rate=3e-3), text_data,
                              trainer_class=Trainer)
    assert not any(recorder.sparse)
    curve = list(losses(trainer).values())
    assert sum(curve[-3:]) < sum(curve[:3])
    assert all(not torch.equal(table.weight, start[i]) for i, table in tables(model).items())


def test_activation_checkpointing_and_bf16_autocast_under_engram_trainer(tmp_path, text_data):
    runs = {}
    for name, overrides in {"fp32": {}, "checkpointed": {"activation_checkpointing": True},
                            "bf16": {"bf16": True}}.items():
        model = tiny_model(vocab_size=99)
        dtypes = set()
        model.model.layers[0].engram.kv_proj.key_proj.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
        trainer, recorder = train(model, training_args(tmp_path / name, **overrides), text_data)
        assert all(recorder.sparse), name
        runs[name] = (trainer, dtypes)
    assert runs["fp32"][1] == runs["checkpointed"][1] == {torch.float32}
    assert runs["bf16"][1] == {torch.bfloat16}
    assert runs["checkpointed"][0].model.is_activation_checkpointing
    for (name, param), expected in zip(runs["checkpointed"][0].model.named_parameters(),
                                       runs["fp32"][0].model.parameters()):
        torch.testing.assert_close(param, expected, atol=1e-6, rtol=1e-5, msg=name)
    fp32, bf16 = losses(runs["fp32"][0]), losses(runs["bf16"][0])
    assert fp32.keys() == bf16.keys()
    assert all(abs(bf16[step] - fp32[step]) < 0.05 for step in fp32)
    assert runs["bf16"][0].model.lm_head.weight.dtype == torch.float32  # autocast: the weights stay fp32


def test_engram_trainer_leaves_an_explicit_other_optimizer_alone(tmp_path):
    model = tiny_model()
    trainer = EngramTrainer(model=model, args=training_args(tmp_path, optim="sgd"))
    assert type(trainer.create_optimizer()) is torch.optim.SGD
    assert not any(table.sparse for table in tables(model).values())


def test_engram_trainer_refuses_sparse_tables_under_deepspeed(tmp_path):
    """DeepSpeed flattens the tables into dense shards; FSDP2 leaves row-sharded tables out (test_distributed.py)."""
    trainer = EngramTrainer(model=tiny_model(), args=training_args(tmp_path))
    trainer.is_deepspeed_enabled = True
    with pytest.raises(ValueError, match="do not work under DeepSpeed .*sparse_table_grads=False"):
        trainer.create_optimizer()


def test_engram_trainer_on_mhc_and_moe_balances_the_routers(tmp_path, text_data):
    """With DeepSeekMoE layers the Engram optimizer moves the routers' balancing biases after every step."""
    from conftest import BACKBONES

    model = tiny_model(vocab_size=99, **BACKBONES["hc4-moe"])
    biases = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert biases
    trainer, recorder = train(model, training_args(tmp_path, max_steps=3), text_data)
    assert all(recorder.sparse) and len(recorder.sparse) == 3
    assert all(not torch.equal(model.get_buffer(name), bias) for name, bias in biases.items())
    assert all(math.isfinite(loss) for loss in losses(trainer).values())
