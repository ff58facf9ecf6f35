"""transformers' own ModelTesterMixin (from its sdist's tests/test_modeling_common.py), run against our model
families by run.py. Not collected by our suite: it needs that sdist."""

import unittest

import conftest
import torch
from tftests.test_modeling_common import ModelTesterMixin, ids_tensor

from modeling_engram import EngramForCausalLM, EngramModel


class Tester:
    batch_size, seq_length, vocab_size, hidden_size = 3, 7, 97, 32
    num_hidden_layers, num_attention_heads, intermediate_size = 3, 4, 64
    is_training, base_model_class = True, EngramModel

    def __init__(self, parent, **overrides):
        self.parent, self.overrides = parent, overrides

    def get_config(self):
        return conftest.tiny_config(**self.overrides)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 3) + 3  # 0-2 are special
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0  # one left-padded row
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class EngramTester(ModelTesterMixin):
    all_model_classes = (EngramModel, EngramForCausalLM)
    overrides: dict = {}

    def setUp(self):
        self.model_tester = Tester(self, **self.overrides)


class TestHc1(EngramTester, unittest.TestCase):
    overrides = dict(hc_mult=1)


class TestHc4(EngramTester, unittest.TestCase):
    overrides = dict(hc_mult=4)


class TestMoe(EngramTester, unittest.TestCase):
    overrides = dict(hc_mult=1, **conftest.TINY_MOE)
