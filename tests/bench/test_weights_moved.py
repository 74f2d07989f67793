"""bench/weights_moved.py: the learner's initialisation rebuilt, and each stage's change."""

from __future__ import annotations

import torch

from revisit.config import LearnerSettings
from revisit.learner.trainer import Trainer
from tests.conftest import load_bench


def test_an_untrained_model_has_not_moved_and_a_scaled_stage_has() -> None:
    bench = load_bench("weights_moved")
    settings = LearnerSettings(queue_size=64, seed=3)
    state = Trainer(settings).model.state_dict()
    saved = settings.model_dump()
    init = bench.initial_state(saved)
    assert all(v == 0.0 for values in bench.moved(state, init).values() for v in values)

    moved = {k: v.clone() for k, v in state.items()}
    for name in moved:
        if name.startswith("encoder.layer4.") and moved[name].dim() == 4:
            moved[name] *= 1.1
    changes = bench.moved(moved, init)
    assert set(changes) == {"stem", "layer1", "layer2", "layer3", "layer4", "head"}
    assert all(abs(v - 0.1) < 1e-5 for v in changes["layer4"])
    assert all(v == 0.0 for stage in ("stem", "layer1", "head") for v in changes[stage])
    # Another seed is another initialisation: far from this one.
    other = bench.initial_state({**saved, "seed": 4})
    assert min(bench.moved(state, other)["layer3"]) > 1.0
    assert torch.equal(state["encoder.conv1.weight"], init["encoder.conv1.weight"])
