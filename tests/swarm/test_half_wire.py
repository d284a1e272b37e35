"""The 16-bit wire option: hidden states and their grads travel in float16 or bfloat16, within a tolerance."""

from __future__ import annotations

import pytest
from swarm_testing import chain_vs_local_blocks, swarm_config

from ptune_search.swarm.client.remote_chain import RemoteBlockChain

# Max abs difference from float32 local blocks (output, input grad, prompt grad) on the tiny model, whose
# values are of order 1: one rounding to 16 bits is a relative 2**-11 (float16) or 2**-8 (bfloat16) per hop,
# grown by the blocks; the documented tolerance of the option (see wire.HALF_WIRE_DTYPES).
TOLERANCE = {"float16": 1e-2, "bfloat16": 8e-2}  # measured: 3.3e-3 and 2.4e-2


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_half_wire_forward_and_grads_are_within_its_tolerance_of_float32(swarm_model, swarm2, wire_dtype):
    config = swarm_config(swarm_model, swarm2, wire_dtype=wire_dtype)
    differences = chain_vs_local_blocks(swarm_model, config, batch=3, seed=5)
    assert all(difference <= TOLERANCE[wire_dtype] for difference in differences), differences
    assert differences[0] > 1e-6, "the hidden states did not travel in 16 bits"


def test_an_unknown_wire_dtype_is_refused_before_joining_the_swarm(swarm_model, swarm2):
    with pytest.raises(ValueError, match="wire_dtype must be None .* got 'float8'"):
        RemoteBlockChain.connect(swarm_config(swarm_model, swarm2, wire_dtype="float8"))
