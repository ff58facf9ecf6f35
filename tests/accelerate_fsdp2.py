"""Run examples/train.py (its arguments) through accelerate's own FSDP2 preparation on the CPU.

accelerate turns FSDP on for accelerators only; on CPUs EngramTrainer shards the model itself and accelerate leaves it
alone. On GPUs the Trainer builds the optimizer first and accelerate's FSDP2 `prepare` remaps it onto the model that
EngramTrainer sharded. This script makes accelerate's state say FSDP on the CPU (gloo), so that GPU path runs in the
tests (test_distributed.py) against the one-process reference.
"""

import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

TRAIN = str(Path(__file__).resolve().parents[1] / "examples" / "train.py")
original_init = AcceleratorState.__init__


def fsdp_on_cpu(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    if kwargs.get("fsdp_plugin") is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, kwargs["fsdp_plugin"]


AcceleratorState.__init__ = fsdp_on_cpu
sys.argv = [TRAIN, *sys.argv[1:]]
runpy.run_path(TRAIN, run_name="__main__")
