"""gem_backend.evaluation.bench: the FLOP count (attention included) against the hand count."""

from __future__ import annotations

import pytest
import torch

from gem_backend.algorithm.gem import GEM
from gem_backend.evaluation.bench import analytic_forward_flops, count_forward_flops, machine_info
from helpers import golden_model


@pytest.mark.parametrize("size,ss_attn_iter", [(224, 1), (160, 2)])
def test_counted_flops_match_the_hand_count(size, ss_attn_iter):
    """The counter (torch's, plus formulas for CPU fused attention and nn.MultiheadAttention's
    fused op) must agree with the formula written out in BENCHMARKS.md within 5 %; without the
    attention formulas it would miss most of a GEM block's work."""
    from torch.utils.flop_counter import FlopCounterMode

    gem = GEM(golden_model(), ss_attn_iter=ss_attn_iter)
    x = torch.randn(1, 3, size, size)
    counted = count_forward_flops(gem, x)
    hand = analytic_forward_flops(gem, size, size)["total"]
    assert abs(counted - hand) / hand < 0.05
    with torch.inference_mode(), FlopCounterMode(display=False) as plain:
        gem.encode_image(x)
    assert plain.get_total_flops() < 0.95 * hand  # what the plain counter gave: attention missed


def test_machine_info_names_the_cpu_and_its_bf16_support():
    info = machine_info()
    assert info["cores"] >= 1 and info["cpu"]
    assert isinstance(info["native_bf16"], bool) and isinstance(info["cpu_flags"], list)
