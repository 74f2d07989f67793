"""The CPU training recipe: learning-rate schedule, training crops, device, band statistics."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch

from revisit.config import LearnerSettings
from revisit.db import learning
from revisit.errors import ConfigError
from revisit.ingest.chips import ChipStore
from revisit.learner import checkpoint as ckpt
from revisit.learner.encoder import GroupedBatchNorm2d, batchnorm_segments
from revisit.learner.loader import RawBatch, TrainBatch, assemble_batch
from revisit.learner.mining import TupleBatch
from revisit.learner.online import OnlineLearner
from revisit.learner.trainer import (
    Trainer,
    _QuerySide,
    effective_lr,
    key_groups,
    learner_augment,
    learning_rate,
    query_groups,
    resolve_device,
    segmented_pass,
    step_key_groups,
)
from tests.learner.conftest import learner_settings


def test_learning_rate_warms_up_then_decays_along_a_cosine_to_its_floor() -> None:
    s = LearnerSettings(lr_warmup_steps=10, lr_horizon_steps=110, lr_min_ratio=0.1)
    base = effective_lr(s)
    assert learning_rate(s, 1) == pytest.approx(base / 10)
    assert learning_rate(s, 10) == pytest.approx(base)
    assert learning_rate(s, 60) == pytest.approx(base * (0.1 + 0.9 * 0.5))
    assert learning_rate(s, 110) == pytest.approx(base * 0.1)
    assert learning_rate(s, 10_000) == pytest.approx(base * 0.1)
    rates = [learning_rate(s, k) for k in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(rates))
    constant = LearnerSettings(lr_warmup_steps=0, lr_schedule="constant")
    assert learning_rate(constant, 1) == learning_rate(constant, 5000) == effective_lr(constant)
    assert not math.isnan(learning_rate(LearnerSettings(lr_warmup_steps=0), 1))


def test_crop_size_is_validated() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        LearnerSettings(crop_size=16)
    with pytest.raises(ValueError, match="crop_scale"):
        LearnerSettings(crop_scale=(0.6, 0.2))
    assert learner_augment(LearnerSettings(crop_size=0)).size is None
    assert learner_augment(LearnerSettings(crop_size=48)).size == 48


def test_cpu_device_and_a_missing_cuda() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_trainer_state_is_on_the_cpu_and_in_channels_last_it_trains_alike() -> None:
    trainer = Trainer(LearnerSettings(queue_size=64, channels_last=True))
    weight = trainer.model.encoder.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    state = trainer.state_dict()
    assert all(v.device.type == "cpu" for v in state["model"].values())
    plain = Trainer(LearnerSettings(queue_size=64, channels_last=False))
    plain.load_state_dict(state)
    x = torch.rand(2, 12, 32, 32) * 0.3
    trainer.model.eval()
    plain.model.eval()
    torch.testing.assert_close(trainer.model.features(x), plain.model.features(x))


def test_settings_file_rejects_an_unknown_policy(tmp_path: Path) -> None:
    from revisit.config import load_settings

    with pytest.raises(ConfigError, match="augment"):
        load_settings(data_dir=tmp_path, learner={"augment": "hue"})


def test_a_new_model_estimates_its_band_statistics_and_keeps_them(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var", normalization_chips=32)
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        assert learner.trainer.model.encoder.normalize.is_identity
        learner.run(5)
        normalize = learner.trainer.model.encoder.normalize
        mean, std = normalize.mean.clone(), normalize.std.clone()
    assert not normalize.is_identity
    # Simulated reflectance: the visible bands are darker than the near infrared.
    assert 0.0 < float(mean[3]) < float(mean[7]) < 1.0 and bool((std > 0).all())
    with world_engine.connect() as conn:
        latest = learning.latest_model_version(conn)
    assert latest is not None and latest.checkpoint_key is not None
    payload = ckpt.load_checkpoint(tmp_path / "var", latest.checkpoint_key)
    assert torch.equal(payload["trainer"]["model"]["key_encoder.normalize.mean"], mean)
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        assert torch.equal(learner.trainer.model.encoder.normalize.mean, mean)
        learner.run(2)  # a resumed model keeps its statistics
        assert torch.equal(learner.trainer.model.encoder.normalize.std, std)


def test_normalization_none_keeps_the_identity(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var", normalization="none")
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        learner.run(2)
        assert learner.trainer.model.encoder.normalize.is_identity


def test_an_old_checkpoint_resumes_with_identity_statistics(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var")
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        learner.run(5)
    with world_engine.connect() as conn:
        latest = learning.latest_model_version(conn)
    assert latest is not None and latest.checkpoint_key is not None
    # Rewrite the checkpoint as one from before the standardisation existed.
    payload = ckpt.load_checkpoint(tmp_path / "var", latest.checkpoint_key)
    model = payload["trainer"]["model"]
    for key in [k for k in model if ".normalize." in k]:
        del model[key]
    sha256, _ = ckpt.save_checkpoint(
        tmp_path / "var", latest.checkpoint_key, {k: v for k, v in payload.items() if k != "format"}
    )
    with world_engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE model_version SET metrics = jsonb_set(metrics, '{sha256}',"
                " to_jsonb(CAST(:s AS text))) WHERE id = :id"
            ),
            {"s": sha256, "id": latest.id},
        )
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        assert learner.trainer.model.encoder.normalize.is_identity
        summary = learner.run(2)
        assert learner.trainer.model.encoder.normalize.is_identity  # never re-estimated
    assert summary.steps == 2 and np.isfinite(summary.mean_loss)


def test_a_missing_k_plus_falls_back_to_a_view_at_the_chips_size_and_trains() -> None:
    # Two-date imagery: no k+ anywhere, so every positive is a second view of q.
    settings = LearnerSettings(queue_size=64, crop_size=32, lr_warmup_steps=0)
    rng = np.random.default_rng(0)
    n = 4
    chips = rng.integers(300, 3000, size=(n, 12, 64, 64), dtype=np.uint16)
    tuples = TupleBatch(
        location_id=np.arange(n),
        query_id=np.arange(n),
        positive_id=np.full(n, -1),
        longterm_id=np.arange(n, 2 * n),
        query_time=np.full(n, 4e8),
        longterm_time=np.full(n, 3e8),
    )
    raw = RawBatch(
        step=1, tuples=tuples, query=chips, positive=np.zeros_like(chips), longterm=chips
    )
    batch = assemble_batch(
        raw, augment=learner_augment(settings), generator=torch.Generator(), method="caco"
    )
    assert batch.x_positive.shape == batch.x_query.shape == (n, 12, 64, 64)
    assert batch.query_view.shape == (n, 12, 32, 32)
    assert float(batch.x_positive.abs().sum()) > 0
    result = Trainer(settings).train_step(batch, changed=np.zeros(n, dtype=bool))
    assert np.isfinite(result.loss) and np.isfinite(result.ratio).all()


def test_a_new_model_starts_its_schedule_at_its_own_first_step(
    world_url: str, world_engine: sa.Engine, world_store: ChipStore, tmp_path: Path
) -> None:
    settings = learner_settings(world_url, tmp_path / "var", lr_warmup_steps=10)
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        learner.run(3)
        assert learner.trainer.start_step == 0
    with OnlineLearner(
        settings=settings, engine=world_engine, store=world_store, new_model=True
    ) as learner:
        assert learner.trainer.start_step == 3
        learner.run(1)  # step 4 of the database, step 1 of this model: a tenth of the rate
        rate = learner.trainer.optimizer.param_groups[0]["lr"]
        assert rate == pytest.approx(learning_rate(settings.learner, 1))
    with OnlineLearner(settings=settings, engine=world_engine, store=world_store) as learner:
        assert learner.trainer.start_step == 3  # resumed from its checkpoint


def _random_batch(
    settings: LearnerSettings, longterm_id: np.ndarray, *, step: int, seed: int
) -> TrainBatch:
    """A caco batch of random 64 px chips, a row per entry of ``longterm_id`` (-1: none)."""
    n = len(longterm_id)
    chips = np.random.default_rng(seed).integers(
        300, 3000, size=(3, n, 12, 64, 64), dtype=np.uint16
    )
    tuples = TupleBatch(
        location_id=np.arange(n),
        query_id=np.arange(n),
        positive_id=np.arange(n, 2 * n),
        longterm_id=longterm_id,
        query_time=np.full(n, 4e8),
        longterm_time=np.full(n, 3e8),
    )
    raw = RawBatch(step=step, tuples=tuples, query=chips[0], positive=chips[1], longterm=chips[2])
    return assemble_batch(
        raw, augment=learner_augment(settings), generator=torch.Generator(), method="caco"
    )


@pytest.mark.parametrize("distance", ["dense", "embedding"])
def test_the_step_measures_r_with_the_configured_distance(distance: str) -> None:
    import copy

    import torch.nn.functional as F

    from revisit.learner.change import DEFAULT_DENSE_DEPTH, change_ratio, dense_distance

    settings = LearnerSettings(
        queue_size=64, crop_size=32, lr_warmup_steps=0, change_distance=distance
    )
    n = 4
    # Row 1 has no long-term image.
    batch = _random_batch(settings, np.array([8, -1, 10, 11]), step=1, seed=1)
    trainer = Trainer(settings)
    before = copy.deepcopy(trainer.model)  # the key side as the step sees it
    valid = batch.longterm_valid
    keyed = F.interpolate(
        torch.cat([batch.x_query, batch.x_positive, batch.x_longterm[valid]]),
        size=(32, 32),
        mode="bilinear",
        antialias=True,
    )
    keys, maps = before.key_with_maps(keyed, DEFAULT_DENSE_DEPTH)
    result = trainer.train_step(batch, changed=np.zeros(n, dtype=bool))

    assert valid.tolist() == [True, False, True, True]
    assert np.isnan(result.long_dist[1]) and np.isnan(result.ratio[1])
    if distance == "dense":
        long = dense_distance([m[:n][valid] for m in maps], [m[2 * n :] for m in maps])
        short = dense_distance([m[:n] for m in maps], [m[n : 2 * n] for m in maps])
    else:
        f_lt = torch.zeros_like(keys[0][:n])
        f_lt[valid] = keys[0][2 * n :]
        ratio = change_ratio(keys[0][:n], keys[0][n : 2 * n], f_lt)
        long, short = ratio.long_dist[valid.numpy()], ratio.short_dist
    np.testing.assert_allclose(result.long_dist[valid.numpy()], long, rtol=1e-4)
    np.testing.assert_allclose(result.short_dist, short, rtol=1e-4)
    np.testing.assert_allclose(
        result.ratio[valid.numpy()], long / (short[valid.numpy()] + 1e-4), rtol=1e-4
    )


def test_key_groups_never_hold_a_locations_query_group_and_are_balanced() -> None:
    generator = torch.Generator().manual_seed(0)
    for n, splits in ((64, 4), (10, 3), (7, 2), (64, 8)):
        groups = key_groups(n, splits, generator)
        own = query_groups(n, splits)
        assert (groups != own).all()
        counts = torch.bincount(groups, minlength=splits)
        assert int(counts.max() - counts.min()) <= 1 + n % splits
        # Each query group's members are spread over every other group.
        for g in range(splits):
            assert set(groups[own == g].tolist()) == set(range(splits)) - {g} or n < splits**2
    assert key_groups(16, 4, torch.Generator().manual_seed(3)).tolist() == (
        key_groups(16, 4, torch.Generator().manual_seed(3)).tolist()
    )
    with pytest.raises(ValueError, match="splits"):
        key_groups(4, 1, generator)
    with pytest.raises(ValueError, match="splits"):
        key_groups(4, 5, generator)
    settings = LearnerSettings(bn_splits=4)
    assert step_key_groups(LearnerSettings(), 5, 64) is None  # one group by default
    assert step_key_groups(settings, 5, 1) is None
    assert step_key_groups(settings, 5, 3) is not None  # min(splits, n) groups
    drawn = [step_key_groups(settings, step, 64) for step in (5, 5, 6)]
    assert all(g is not None for g in drawn)
    first, again, other = (g.tolist() for g in drawn if g is not None)
    assert first == again != other  # drawn from the seed and the step alone


def test_a_segmented_pass_normalises_each_group_on_its_own_statistics() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), GroupedBatchNorm2d(4)).train()
    plain = torch.nn.BatchNorm2d(4).train()
    plain.load_state_dict(net[1].state_dict())
    x = torch.randn(10, 3, 5, 5) * torch.arange(1, 11.0)[:, None, None, None]
    rows = torch.tensor([0, 1, 0, 2, 1, 0, 0, 1, 1, 0])
    (out,), (again,) = segmented_pass(lambda t: ([net(t)], [2 * net(t)]), x, rows, net)
    for g in (0, 1, 2):
        members = rows == g
        expected = plain(net[0](x[members]))
        torch.testing.assert_close(out[members], expected)
        torch.testing.assert_close(again[members], 2 * expected)
    assert not torch.allclose(out, plain(net[0](x)))  # one batch would share the statistics
    assert net[1].segments is None  # only within the pass
    # Outside a pass, and in eval mode, it is plain batch norm.
    torch.testing.assert_close(net(x), plain(net[0](x)))
    with batchnorm_segments(net, [5, 5]):
        net.eval()
        plain.load_state_dict(net[1].state_dict())
        plain.eval()
        torch.testing.assert_close(net(x), plain(net[0](x)))
        net.train()
        with pytest.raises(ValueError, match="do not add up"):
            net(x[:3])
    with pytest.raises(ValueError, match="at least one row"):
        segmented_pass(lambda t: ([t], []), x[:0], rows[:0], net)


def test_shuffle_bn_measures_r_on_each_locations_key_group() -> None:
    """With bn_splits the step's keys and maps are those of one pass per key group."""
    import copy

    import torch.nn.functional as F

    from revisit.learner.change import DEFAULT_DENSE_DEPTH, dense_distance

    settings = LearnerSettings(queue_size=64, crop_size=32, lr_warmup_steps=0, bn_splits=2)
    n = 6
    batch = _random_batch(settings, np.array([12, -1, 14, 15, 16, 17]), step=7, seed=2)
    trainer = Trainer(settings)
    before = copy.deepcopy(trainer.model)
    groups = step_key_groups(settings, 7, n)
    assert groups is not None
    valid = batch.longterm_valid

    def view(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)

    long, short = np.full(n, np.nan), np.zeros(n)
    for g in (0, 1):
        own = groups == g
        k = int(own.sum())
        lt = own & valid
        _, maps = before.key_with_maps(
            view(torch.cat([batch.x_query[own], batch.x_positive[own], batch.x_longterm[lt]])),
            DEFAULT_DENSE_DEPTH,
        )
        short[own.numpy()] = dense_distance([m[:k] for m in maps], [m[k : 2 * k] for m in maps])
        long[lt.numpy()] = dense_distance(
            [m[:k][valid[own]] for m in maps], [m[2 * k :] for m in maps]
        )
    result = trainer.train_step(batch, changed=np.zeros(n, dtype=bool))

    assert np.isfinite(result.loss)
    np.testing.assert_allclose(result.short_dist, short, rtol=1e-4)
    np.testing.assert_allclose(result.long_dist, long, rtol=1e-4)
    # The query side ran in the two chunks of query_groups, each on its own statistics.
    x = torch.randn(4, 12, 32, 32)
    side = _QuerySide(before)
    (split,), _ = side(x, 2)
    halves = torch.cat([before.heads[0](before.encoder(h)) for h in (x[:2], x[2:])])
    torch.testing.assert_close(split, halves)


def test_adamw_trains_and_a_change_of_optimiser_keeps_the_weights(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = LearnerSettings(queue_size=64, crop_size=32, lr_warmup_steps=0)
    sgd = Trainer(settings)
    sgd.train_step(
        _random_batch(settings, np.array([8, 9]), step=1, seed=1), changed=np.zeros(2, bool)
    )
    state = sgd.state_dict()

    adamw_settings = settings.model_copy(update={"optimizer": "adamw", "weight_decay": 0.05})
    adamw = Trainer(adamw_settings)
    assert isinstance(adamw.optimizer, torch.optim.AdamW)
    with caplog.at_level("WARNING", logger="revisit.learner.trainer"):
        adamw.load_state_dict(state)
    assert "optimiser is sgd, the settings' adamw" in caplog.text
    for name, value in state["model"].items():  # the weights came over, the state did not
        torch.testing.assert_close(adamw.model.state_dict()[name], value)
    assert not adamw.optimizer.state
    before = adamw.model.encoder.layer4[1].conv2.weight.detach().clone()
    result = adamw.train_step(
        _random_batch(adamw_settings, np.array([8, 9]), step=2, seed=2), changed=np.zeros(2, bool)
    )
    assert math.isfinite(result.loss)
    after = adamw.model.encoder.layer4[1].conv2.weight.detach()
    assert not torch.equal(before, after)
    assert adamw.optimizer.state  # AdamW's moments now exist

    # The same optimiser resumes its state; the settings' hyperparameters win over the saved.
    resumed = Trainer(adamw_settings.model_copy(update={"weight_decay": 0.01}))
    resumed.load_state_dict(adamw.state_dict())
    assert resumed.optimizer.state
    assert {g["weight_decay"] for g in resumed.optimizer.param_groups} == {0.01}


def test_an_unknown_optimiser_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        LearnerSettings(optimizer="adam")  # type: ignore[arg-type]
