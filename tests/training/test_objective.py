"""The flow-matching loss on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from dreamstereo.training.objective import flow_matching_loss


def test_mask_weighted_loss_matches_a_hand_computed_value():
    # 2 latent channels, 1 frame, 1 x 2 cells; velocity 0, so the squared errors are the targets squared:
    # cell 0 (to inpaint): 2^2 = 4 and 1^2 = 1, cell 1 (known): 1^2 = 1 and 3^2 = 9.
    velocity = torch.zeros(1, 2, 1, 1, 2)
    target = torch.tensor([[[[[2.0, 1.0]]], [[[1.0, 3.0]]]]])  # (B=1, C=2, F=1, h=1, w=2)
    hole = torch.zeros(1, 4, 1, 1, 2)
    hole[0, 2, 0, 0, 0] = 1.0  # one of the 4 packed mask channels marks cell 0; the channel maximum counts
    # weight 1 + 2 = 3 on cell 0, 1 on cell 1: (3 * (4 + 1) + 1 * (1 + 9)) / (3 * 2 + 1 * 2) = 25 / 8
    assert float(flow_matching_loss(velocity, target, hole, mask_weight=2.0)) == pytest.approx(25 / 8)
    assert float(flow_matching_loss(velocity, target, hole, mask_weight=0.0)) == pytest.approx(15 / 4)  # plain
    assert float(flow_matching_loss(velocity, target, torch.zeros_like(hole), mask_weight=2.0)) == \
        pytest.approx(15 / 4)  # nothing to inpaint: every weight is 1
