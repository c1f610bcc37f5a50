"""The sampler chain's transforms, each against its definition."""

import torch

from kobold_desktop.engine.sampling import RangedRepetitionPenalty


def test_ranged_repetition_penalty_only_touches_recent_tokens():
    scores = torch.tensor([[2.0, 2.0, -2.0, 2.0]])
    history = torch.tensor([[0, 3, 2]])
    out = RangedRepetitionPenalty(2.0, window=2)(history, scores.clone())
    assert out.tolist() == [[2.0, 2.0, -4.0, 1.0]]  # token 0 is out of the window
    out = RangedRepetitionPenalty(2.0, window=0)(history, scores.clone())
    assert out.tolist() == [[1.0, 2.0, -4.0, 1.0]]
