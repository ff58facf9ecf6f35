"""The private transformers methods we override, with the parameters our overrides rely on. transformers>=5.24,<6 may
change a private method in a minor release; this fails first, naming it, instead of a silent change of behaviour."""

import inspect
from types import FunctionType

import pytest
from transformers import PreTrainedModel, Trainer

from modeling_engram import EngramForCausalLM, EngramPreTrainedModel

# owner, method, its parameters as our override calls and is called with
PRIVATE = [
    (PreTrainedModel, "_load_pretrained_model", ["model", "state_dict", "checkpoint_files", "load_config"]),
    (PreTrainedModel, "_check_and_adjust_experts_implementation", ["self", "experts_implementation"]),
    (PreTrainedModel, "_can_set_experts_implementation", []),
    (PreTrainedModel, "_can_set_attn_implementation", []),
    (Trainer, "_clip_grad_norm", ["self", "model"]),
    (Trainer, "_get_grad_norm", ["self", "model", "grad_norm"]),
    (Trainer, "_save_optimizer_and_scheduler", ["self", "output_dir"]),
    (Trainer, "_load_from_checkpoint", ["self", "resume_from_checkpoint", "model"]),
    (Trainer, "_load_optimizer_and_scheduler", ["self", "checkpoint"]),
]


@pytest.mark.parametrize("owner, name, parameters", PRIVATE, ids=[f"{o.__name__}.{n}" for o, n, _ in PRIVATE])
def test_the_private_transformers_methods_we_override_keep_their_parameters(owner, name, parameters):
    assert list(inspect.signature(getattr(owner, name)).parameters)[: len(parameters)] == parameters


def test_every_private_override_is_listed():
    """A new override of a private transformers method must join PRIVATE above (`_init_weights` is the documented
    hook for custom models; class attributes such as `_supports_sdpa` are transformers' documented model flags)."""
    from modeling_engram.training import EngramTrainer

    listed = {(owner, name) for owner, name, _ in PRIVATE}
    for ours, owner in ((EngramPreTrainedModel, PreTrainedModel), (EngramForCausalLM, PreTrainedModel),
                        (EngramTrainer, Trainer)):
        overridden = {name for klass in ours.__mro__ if klass.__module__.startswith("modeling_engram")
                      for name, value in vars(klass).items() if name.startswith("_") and not name.startswith("__")
                      and hasattr(owner, name) and isinstance(value, (FunctionType, classmethod, staticmethod))}
        assert overridden - {"_init_weights"} <= {name for o, name in listed if o is owner}, overridden


def test_accelerate_leaves_a_model_it_marked_prepared_alone():
    """EngramTrainer marks a model it sharded with FSDP2 where accelerate does not shard (CPUs) as prepared
    (`_is_accelerate_prepared`, accelerate's own guard against wrapping twice), so accelerate does not wrap its
    DTensor parameters in DDP. The end-to-end runs are in test_distributed.py; this names the guard if it goes."""
    from accelerate import Accelerator
    from torch import nn

    model = nn.Linear(2, 2)
    model._is_accelerate_prepared = True
    assert Accelerator(cpu=True).prepare_model(model) is model
