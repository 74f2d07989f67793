"""How far training moved the encoder from its initialisation, stage by stage.

A contrastive model that probes like random weights (docs/probes.md) may simply
not have moved: this loads a learner checkpoint, rebuilds the model the learner
started from (the same seed and sizes, so the same initial weights), and prints,
for each stage of the query encoder (the stem, layer1 to layer4) and the
projection head, the relative change ‖w - w₀‖ / ‖w₀‖ of its convolution and
linear weights: median and range over the stage's tensors. Batch-norm
parameters, queues and the input standardisation are left out (they do not
start random).

The initialisation is rebuilt as :class:`revisit.learner.trainer.Trainer`
makes it: ``torch.manual_seed(learner.seed)`` then the model, with the
checkpoint's own settings. A model started with ``--new-model`` at a later
step was initialised the same way; one started ``--init-from`` another
checkpoint was not, and its figures measure the distance from a random start.

    .venv/bin/python bench/weights_moved.py CHECKPOINT.pt

The figure printed last, on one line: ``weights moved: stem X, layer1 X, ...``
(the medians).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from revisit.config import LearnerSettings
from revisit.learner.checkpoint import load_checkpoint_file
from revisit.learner.trainer import Trainer

#: The query encoder's modules with weights to compare, and the stage each is reported as.
STAGES = {"conv1": "stem", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}}


def stage_of(name: str) -> str | None:
    """The stage a query-side weight belongs to (``stem``, ``layer1``…, ``head``), or None."""
    if name.startswith("encoder."):
        return STAGES.get(name.split(".")[1])
    if name.startswith("heads."):
        return "head"
    return None


def initial_state(saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model state the learner of these settings started from."""
    known = {k: v for k, v in saved.items() if k in LearnerSettings.model_fields}
    settings = LearnerSettings.model_validate({**known, "device": "cpu"})
    return Trainer(settings).model.state_dict()


def moved(state: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Relative change of every convolution and linear weight, grouped by stage."""
    out: dict[str, list[float]] = {}
    for name, value in state.items():
        stage = stage_of(name)
        w0 = init.get(name)
        if stage is None or w0 is None or value.dim() < 2 or w0.shape != value.shape:
            continue
        w0 = w0.float()
        change = float((value.float() - w0).norm() / w0.norm().clamp_min(1e-12))
        out.setdefault(stage, []).append(change)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a learner checkpoint (.pt)")
    args = parser.parse_args(argv)
    payload = load_checkpoint_file(args.checkpoint)
    state = payload["trainer"]["model"]
    changes = moved(state, initial_state(dict(payload.get("settings") or {})))
    if not changes:
        raise SystemExit(f"{args.checkpoint}: no encoder weights found")
    print(f"{args.checkpoint.name}: {payload.get('method')}, step {payload.get('step')}")
    print("| stage | tensors | median | min | max |")
    print("|---|---:|---:|---:|---:|")
    for stage, values in changes.items():
        print(
            f"| {stage} | {len(values)} | {statistics.median(values):.3f}"
            f" | {min(values):.3f} | {max(values):.3f} |"
        )
    medians = ", ".join(f"{s} {statistics.median(v):.2f}" for s, v in changes.items())
    print(f"weights moved: {medians}")


if __name__ == "__main__":
    main()
