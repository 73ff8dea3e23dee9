"""ser.training: the recipe's pieces, and distributed smoke runs of the Ray Train job on local Ray."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, write_ravdess_like
from e2e.conftest import SER, http_answers, ser
from e2e.faults import kill_tree
from sklearn.utils.class_weight import compute_class_weight

from ser import audio, bundle, calibration, features, ravdess, training
from ser import config as config_io
from ser.model import ModelConfig
from ser.predict import normalize, softmax


@pytest.mark.parametrize("counts", [[10, 20, 10, 10, 40, 10, 10, 20], [3, 0, 2, 2, 1, 0, 1, 1]], ids=["all", "absent"])
def test_class_weights_balanced_with_surprise_boost(counts):
    labels = np.repeat(np.arange(8), counts)
    weights = training.class_weights(labels, 8, surprise_weight=1.5)
    balanced = len(labels) / (8 * np.maximum(counts, 1))  # sklearn's 'balanced' where a class is present
    if all(counts):
        np.testing.assert_allclose(balanced, compute_class_weight("balanced", classes=np.arange(8), y=labels))
    surprised = ravdess.EMOTIONS.index("surprised")
    np.testing.assert_allclose(weights, np.where(np.arange(8) == surprised, 1.5, 1.0) * balanced, rtol=1e-6)
    assert weights.dtype == np.float32


def test_augment_adds_noise_or_masks_ten_percent_of_time():
    batch = np.ones((64, *features.FEATURE_SHAPE), np.float32)
    out = training.augment(batch, np.random.default_rng(0), training.AugmentConfig())
    assert out.shape == batch.shape and out.dtype == np.float32
    assert (batch == 1).all()  # the input is left alone
    kinds = []
    for sample in out:
        masked = np.flatnonzero((sample == 0).all(axis=0))
        if masked.size:
            assert masked.size == round(0.1 * features.N_FRAMES) and np.ptp(masked) == masked.size - 1
            assert (np.delete(sample, masked, axis=1) == 1).all()
            kinds.append("mask")
        else:
            assert (sample != 1).all() and abs(sample.std() - 0.1) < 0.01
            kinds.append("noise")
    assert 16 < kinds.count("mask") < 48


def test_augment_probability_zero_is_identity():
    batch = np.random.default_rng(1).standard_normal((4, *features.FEATURE_SHAPE)).astype(np.float32)
    out = training.augment(batch, np.random.default_rng(0), training.AugmentConfig(probability=0.0))
    np.testing.assert_array_equal(out, batch)


def test_one_window_per_file():
    owner = np.array([0, 0, 0, 1, 2, 2, 5, 5, 5, 5])
    picks = set()
    for seed in range(50):
        chosen = training.one_window_per_file(owner, np.random.default_rng(seed))
        assert sorted(owner[chosen]) == [0, 1, 2, 5]
        picks.update(chosen.tolist())
    assert picks == set(range(len(owner)))  # every window gets its turn across epochs


def test_mixup_blends_samples_targets_and_weights_with_one_partner_each():
    rng = np.random.default_rng(0)
    n = 16
    x = rng.standard_normal((n, 4, 4)).astype(np.float32)
    y = np.eye(n, dtype=np.float32)  # one class per sample, so each blended target names its partner
    w = rng.uniform(0.5, 2.0, n).astype(np.float32)
    mx, my, mw = training.mixup(x, y, w, np.random.default_rng(1), alpha=0.2)
    assert mx.shape == x.shape and my.shape == y.shape and mw.shape == w.shape
    np.testing.assert_allclose(my.sum(axis=1), 1.0, rtol=1e-6)  # still a distribution over the classes
    blended = 0
    for i in range(n):
        others = np.delete(np.arange(n), i)
        partner = others[my[i, others].argmax()]
        lam = my[i, i]
        if lam == 1.0:  # its own partner
            partner = i
        blended += lam < 0.99
        np.testing.assert_allclose(mx[i], lam * x[i] + (1 - lam) * x[partner], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mw[i], lam * w[i] + (1 - lam) * w[partner], rtol=1e-5)
    assert blended >= 2  # Beta(0.2, 0.2) draws are mostly near 0 or 1, but not all of them


def test_mean_weights_averages_each_variable_in_its_own_dtype():
    checkpoints = [[np.full((2, 2), v, np.float32), np.full(3, -v, np.float32)] for v in (1.0, 2.0, 6.0)]
    mean = training.mean_weights(checkpoints)
    assert [m.shape for m in mean] == [(2, 2), (3,)] and all(m.dtype == np.float32 for m in mean)
    np.testing.assert_array_equal(mean[0], 3.0)
    np.testing.assert_array_equal(mean[1], -3.0)
    np.testing.assert_array_equal(training.mean_weights(checkpoints[:1])[0], checkpoints[0][0])
    with pytest.raises(ValueError, match="average_checkpoints"):
        training.TrainConfig(average_checkpoints=0)


def test_time_budget_must_be_positive():
    assert training.TrainConfig(max_minutes=0.5).max_minutes == 0.5
    with pytest.raises(ValueError, match="max_minutes: expected a budget above 0"):
        training.TrainConfig(max_minutes=0)


@pytest.mark.parametrize(("mode", "shape"), [("global", ()), ("per_band", (features.N_MELS, 1))])
def test_normalization_stats(mode, shape):
    rng = np.random.default_rng(0)
    band_offset = np.linspace(-60, -10, features.N_MELS, dtype=np.float32)[:, None]
    feats = rng.normal(0, 5, (20, *features.FEATURE_SHAPE)).astype(np.float32) + band_offset
    mean, std = training.normalization_stats(feats, mode)
    assert mean.shape == std.shape == shape and mean.dtype == std.dtype == np.float32
    normalized = (feats - mean) / std
    axes = (0, 1, 2) if mode == "global" else (0, 2)
    np.testing.assert_allclose(normalized.mean(axis=axes), 0, atol=1e-4)
    np.testing.assert_allclose(normalized.std(axis=axes), 1, atol=1e-4)


# ---------------------------------------------------------------- the Ray Train job, end to end on local Ray


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def generated_corpus(tmp_path_factory):
    """24 generated clips named like RAVDESS: all 8 emotions, actors 1-24 (train 16, validation 4, test 4)."""
    root = tmp_path_factory.mktemp("corpus")
    write_ravdess_like(root, n=24, seconds=2.0)
    return root


def _smoke_train(tmp_path, feature_cache, stopped_by="epochs", **values):
    values = {"epochs": 1} | values
    config = training.TrainConfig(
        batch_size=8,
        output=str(tmp_path / "bundle"),
        cache_dir=str(feature_cache),
        storage_path=str(tmp_path / "ray"),
        model=ModelConfig(conv_filters=(4, 8, 8), lstm_units=8),
        **values,
    )
    out, card = training.train(config)
    loaded = bundle.load(out)
    assert loaded.card == card and card["num_workers"] == values["num_workers"]
    assert card["stopped_by"] == stopped_by and card["resumed_after"] == [] and card["epoch_loop_seconds"] > 0
    if stopped_by == "epochs":
        assert [row["epoch"] for row in card["history"]] == list(range(1, config.epochs + 1))
    assert "train_loss" in card["history"][0]
    low, high = calibration.TEMPERATURE_BOUNDS
    assert low <= card["calibration"]["temperature"] <= high
    assert loaded.temperature == card["calibration"]["temperature"]
    assert sum(card["split"].values()) == card["n_files"]
    return card


def test_train_distributed_on_generated_corpus_within_a_time_budget(tmp_path, feature_cache, generated_corpus,
                                                                     local_ray):
    """Two workers, 3 epochs and a budget that the first epoch overruns: both stop after it, the bundle is that
    epoch, and the card says why."""
    card = _smoke_train(tmp_path, feature_cache, data_dir=str(generated_corpus), protocol="actors", num_workers=2,
                        epochs=3, patience=3, max_minutes=1e-4, stopped_by="max_minutes")
    assert [row["epoch"] for row in card["history"]] == [1] and card["best_epoch"] == 1
    assert card["train_config"]["max_minutes"] == 1e-4
    assert card["split"] == {"train": 16, "validation": 4, "test": 4}
    assert card["test_actors"] == [21, 22, 23, 24]


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"ser train ended (rc {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.05)


def test_ser_train_beside_another_ray_with_a_dashboard_prints_one_line_per_epoch_and_finishes(
        tmp_path, feature_cache, generated_corpus):
    """`ser train` as a user runs it, starting its own Ray, while another Ray on the machine comes up serving its
    dashboard at the default 127.0.0.1:8265. Ray Train's placement-group cleaner asks the dashboard address its
    cluster advertises whether the controller is alive; a Ray without a dashboard advertises that same address,
    so the cleaner asked the neighbour, which knows no such controller, and removed the training's placement
    group: the training died within seconds. It must finish, printing each epoch's line once (Ray Train's print
    patch would echo it twice), no dump of every report, and nothing from the cleaner: no warning for each
    failed ask (once a second), no traceback for finding several Ray instances."""
    pytest.importorskip("ray.dashboard.optional_deps", reason="the neighbour's dashboard needs ray[default]")
    epochs = 40
    log = tmp_path / "train.log"
    args = ["train", "--data", str(generated_corpus), "--protocol", "actors", "--epochs", str(epochs), "--output",
            str(tmp_path / "bundle"), "--set", f"patience={epochs}", "--set", "batch_size=8",
            "--set", f"cache_dir={feature_cache}", "--set", f"storage_path={tmp_path / 'ray'}",
            "--set", "model.conv_filters=[4, 8, 8]", "--set", "model.lstm_units=8"]
    with log.open("w") as out:
        training_process = subprocess.Popen([SER, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: re.search(r"epoch +1/", log.read_text()), "first epoch", training_process)
    script = ("import ray, time; ray.init(address='local', include_dashboard=True, dashboard_host='127.0.0.1', "
              "dashboard_port=8265, num_cpus=1, log_to_driver=False); time.sleep(600)")
    neighbour = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: http_answers("http://127.0.0.1:8265/api/version"), "neighbour's dashboard",
                  training_process)
        neighbour_up = time.monotonic()
        assert training_process.wait(timeout=600) == 0, log.read_text()[-3000:]
        assert time.monotonic() - neighbour_up > 5, "the training ended too soon after the neighbour came up"
    finally:
        kill_tree(neighbour)
    output = log.read_text()
    assert [len(re.findall(rf"epoch +{n}/{epochs} +loss", output)) for n in range(1, epochs + 1)] == [1] * epochs
    assert "kept epoch" in output and "(stopped by epochs)" in output
    assert "Reporting training result" not in output
    assert "Failed to query Ray Train Controller" not in output and "Traceback" not in output


@pytest.mark.slow  # ~2.5 min each: a reference run and two `ser train` processes; the state round trip is tested below
@pytest.mark.parametrize("num_workers", [1, 2])
def test_ser_train_resumes_an_interrupted_run_exactly_where_it_stopped(tmp_path, feature_cache, generated_corpus,
                                                                        local_ray, num_workers):
    """`ser train` as a user runs it, interrupted with Ctrl-C once an epoch checkpoint is recorded, then
    `ser train --resume` with the folder it printed: the run goes on after that epoch, printing each later epoch
    once, and ends where the same run uninterrupted ends (data order, augmentation, dropout and Adam state
    restored); its epoch checkpoints are gone, the bundle is left."""
    epochs = 12
    values = {"data_dir": str(generated_corpus), "protocol": "actors", "epochs": epochs, "batch_size": 8,
              "num_workers": num_workers, "cpus_per_worker": 1, "cache_dir": str(feature_cache)}
    model = {"model.conv_filters": "[4, 8, 8]", "model.lstm_units": "8"}
    _, reference = training.train(training.TrainConfig(
        **values, model=ModelConfig(conv_filters=(4, 8, 8), lstm_units=8), output=str(tmp_path / "reference"),
        storage_path=str(tmp_path / "ray-reference")))

    args = ["train", "--data", values["data_dir"], "--protocol", "actors", "--epochs", str(epochs), "--output",
            str(tmp_path / "bundle")]
    for key, value in {**values, **model, "storage_path": tmp_path / "ray"}.items():
        if key not in ("data_dir", "protocol", "epochs"):
            args += ["--set", f"{key}={value}"]
    log = tmp_path / "interrupted.log"
    with log.open("w") as out:
        process = subprocess.Popen([SER, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    started = re.compile(r"go on with: ser train --resume (\S+)")
    _wait_for(lambda: started.search(log.read_text()), "run folder line", process)
    folder = Path(started.search(log.read_text()).group(1))
    snapshot = folder / "checkpoint_manager_snapshot.json"
    _wait_for(lambda: snapshot.exists() and json.loads(snapshot.read_text())["latest_checkpoint_result"],
              "recorded epoch checkpoint", process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    interrupted = log.read_text()
    assert f"interrupted: go on with: ser train --resume {folder}\n" in interrupted

    done = ser("train", "--resume", str(folder))
    resumed = done.stdout + done.stderr
    assert done.returncode == 0, resumed[-3000:]
    after = int(re.search(rf"resuming after epoch (\d+)/{epochs}", resumed).group(1))
    assert 1 <= after < epochs
    card = bundle.read_card(tmp_path / "bundle")
    assert [resume["epoch"] for resume in card["resumed_after"]] == [after] and card["stopped_by"] == "epochs"
    assert 0 < card["resumed_after"][0]["loop_seconds"] < card["epoch_loop_seconds"]
    assert f"(resumed after epoch {after}; " in done.stdout
    for key in ("train_loss", "val_nll"):
        np.testing.assert_allclose([row[key] for row in card["history"]],
                                   [row[key] for row in reference["history"]], rtol=1e-5)
    x = np.random.default_rng(0).standard_normal((2, *features.FEATURE_SHAPE, 1)).astype(np.float32)
    np.testing.assert_allclose(bundle.load(tmp_path / "bundle").model(x), bundle.load(tmp_path / "reference").model(x),
                               rtol=1e-4, atol=1e-5)
    left = sorted(path.name for path in folder.glob("checkpoint_*/*"))
    assert left == sorted([bundle.MODEL_FILE, bundle.MEAN_FILE, bundle.STD_FILE, bundle.CARD_FILE])  # no epoch state

    printed = [[int(n) for n in re.findall(rf"epoch +(\d+)/{epochs} +loss", out)] for out in (interrupted, resumed)]
    assert printed[0] == list(range(1, len(printed[0]) + 1)) and len(printed[0]) >= after
    assert printed[1] == list(range(after + 1, epochs + 1))
    assert "kept epoch" in done.stdout and "(stopped by epochs)" in done.stdout

    again = ser("train", "--resume", str(folder))  # finished: the bundle, no training
    assert again.returncode == 0 and "epoch" not in again.stdout.split("bundle:")[0]
    assert bundle.read_card(tmp_path / "bundle") == card


def _recorded_run(config: training.TrainConfig, fingerprint: str = "0" * 64, cwd: Path = ROOT) -> Path:
    """The run folder of a run of `config`, started in `cwd`, that recorded itself (RUN_FILE) and was interrupted
    before its first epoch, on data of that fingerprint (all zeros: data that has changed since)."""
    folder = training.run_folder(config, "20261207T000000Z-abcdef")
    folder.mkdir(parents=True)
    run = {"run_id": folder.name, "cwd": str(cwd), "data_fingerprint": fingerprint, "config": config_io.to_dict(config)}
    (folder / training.RUN_FILE).write_text(json.dumps(run))
    return folder


def test_resume_refuses_a_run_whose_data_changed(tmp_path, feature_cache, generated_corpus, local_ray):
    config = training.TrainConfig(data_dir=str(generated_corpus), epochs=1, batch_size=8, cache_dir=str(feature_cache),
                                  output=str(tmp_path / "bundle"), storage_path=str(tmp_path / "ray"))
    folder = _recorded_run(config)
    with pytest.raises(training.ResumeError, match=f"the data changed since run {folder.name} started"):
        training.resume(folder)
    assert not (tmp_path / "bundle").exists()


def test_resumed_run_runs_where_it_started_and_its_cards_record_the_recipe_as_given(
        tmp_path, feature_cache, generated_corpus, local_ray, monkeypatch):
    """A run started with relative paths and resumed from another directory reads and writes where it started,
    and its cards (the ensemble's and each member's) record those relative paths, as an uninterrupted run's do."""
    started_in = tmp_path / "project"
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    config = training.TrainConfig(
        data_dir=os.path.relpath(generated_corpus), cache_dir=os.path.relpath(feature_cache), epochs=1,
        batch_size=8, ensemble=2, output="bundle", storage_path="ray",
        model=ModelConfig(conv_filters=(4, 8, 8), lstm_units=8))
    recipe = config_io.to_dict(config)
    folder = _recorded_run(config, training.data_fingerprint(ravdess.index(generated_corpus)), cwd=started_in)
    monkeypatch.chdir(tmp_path)
    out, card = training.resume(Path("project") / folder.relative_to(started_in))
    assert out == started_in / "bundle" and not (tmp_path / "bundle").exists()
    assert card["train_config"] == recipe
    assert [bundle.read_card(member)["train_config"] for member in sorted((folder / "members").iterdir())] == [
        recipe | {"seed": 42, "ensemble": 1}, recipe | {"seed": 43, "ensemble": 1}]
    assert not any("train_config_changes" in member for member in card["ensemble"]["members"])


def test_ctrl_c_names_the_run_folder_to_resume_once_the_run_is_recorded(tmp_path, local_ray, monkeypatch):
    """Ctrl-C while the features are prepared: a new run has no record yet, so nothing to resume; a resumed run
    is named by its folder, with the command that goes on."""
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "prepare", ctrl_c)
    config = training.TrainConfig(data_dir=str(tmp_path), output=str(tmp_path / "bundle"),
                                  storage_path=str(tmp_path / "ray"))
    with pytest.raises(training.Interrupted, match=r"^interrupted before the run was recorded") as new_run:
        training.train(config)
    assert new_run.value.folder is None

    folder = _recorded_run(config)
    with pytest.raises(training.Interrupted) as resumed:
        training.resume(folder)
    assert resumed.value.folder == folder
    assert str(resumed.value) == f"interrupted: go on with: ser train --resume {folder}"


def test_epoch_checkpoint_restores_the_next_steps_exactly(tmp_path):
    """save_state -> load_state into a model and optimizer built afresh: the next steps are the ones the
    originals take (weights, Adam's moments and step count, the cosine schedule's position, dropout seeds),
    and the progress, kept weights and averaging window come back."""
    import tensorflow as tf

    config = training.TrainConfig(batch_size=4, epochs=3, lr_schedule="cosine",
                                  model=ModelConfig(conv_filters=(4, 8, 8), lstm_units=8))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((4, *features.FEATURE_SHAPE, 1)).astype(np.float32))
    y = tf.constant(np.eye(8, dtype=np.float32)[[0, 3, 5, 7]])
    w = tf.constant(np.ones(4, np.float32))
    model, optimizer, step = training.build_step(config, tf.distribute.get_strategy(), n_train_files=12)
    step(x, y, w)  # away from the initial state a fresh build starts from
    progress = training.Progress(epochs_done=2, history=[{"epoch": 1}, {"epoch": 2, "train_loss": 2.0}],
                                 best={"epoch": 2}, since_best=0, seconds=2.5,
                                 resumed_after=[{"epoch": 1, "loop_seconds": 1.2}])
    kept, window = model.get_weights(), [model.get_weights(), [v * 2 for v in model.get_weights()]]
    training.save_state(tmp_path, model, optimizer, progress, kept, window)
    expected = [float(step(x, y, w)) for _ in range(3)]

    fresh, fresh_optimizer, fresh_step = training.build_step(config, tf.distribute.get_strategy(), n_train_files=12)
    restored, restored_kept, restored_window = training.load_state(tmp_path, fresh, fresh_optimizer)
    assert restored == progress
    for ours, theirs in zip([kept, *window], [restored_kept, *restored_window], strict=True):
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose([float(fresh_step(x, y, w)) for _ in range(3)], expected, rtol=1e-6)


@pytest.mark.data
# 2 workers on real data is slow-only: the distributed step is covered by the generated corpus above.
@pytest.mark.parametrize("num_workers", [pytest.param(2, marks=pytest.mark.slow), 1])
def test_train_on_ravdess_subset(tmp_path, feature_cache, ravdess_dir, local_ray, num_workers):
    card = _smoke_train(  # 2 epochs: the first reports an epoch checkpoint (from rank 0 only), the second the bundle
        tmp_path, feature_cache, data_dir=str(ravdess_dir), protocol="seed", max_files=60, num_workers=num_workers,
        epochs=2,
    )
    assert card["split"] == {"train": 20, "validation": 20, "test": 20}


def test_ensemble_training_and_ser_ensemble_agree(tmp_path, feature_cache, generated_corpus, local_ray):
    config = training.TrainConfig(
        data_dir=str(generated_corpus), epochs=1, batch_size=8, ensemble=2, output=str(tmp_path / "bundle"),
        cache_dir=str(feature_cache), storage_path=str(tmp_path / "ray"), model=ModelConfig(conv_filters=(4, 8, 8),
                                                                                             lstm_units=8),
    )
    out, card = training.train(config)
    members = card["ensemble"]["members"]
    assert [member["seed"] for member in members] == [42, 43]
    assert members[0]["model_sha256"] != members[1]["model_sha256"]
    assert [(member["epochs_run"], member["stopped_by"], member["resumed_after"]) for member in members] == [
        (1, "epochs", [])] * 2
    member_dirs = sorted((tmp_path / "ray" / card["run_id"] / "members").iterdir())
    assert [path.name for path in member_dirs] == ["seed-42", "seed-43"]
    again, again_card = training.ensemble_bundles(member_dirs, tmp_path / "combined")
    assert again_card["calibration"] == card["calibration"]
    x = np.random.default_rng(0).standard_normal((2, *features.FEATURE_SHAPE, 1)).astype(np.float32)
    np.testing.assert_array_equal(bundle.load(out).model(x), bundle.load(again).model(x))

    # growing an ensemble: an ensemble member is flattened, so each base model weighs the same
    longer = bundle.read_card(member_dirs[1])
    longer["train_config"] = longer["train_config"] | {"epochs": 2}
    bundle.write_card(member_dirs[1], longer)
    grown, grown_card = training.ensemble_bundles([out, member_dirs[1]], tmp_path / "grown")
    grown_members = grown_card["ensemble"]["members"]
    assert [member["seed"] for member in grown_members] == [42, 43, 43]
    assert grown_card["train_config"]["ensemble"] == 3
    assert grown_card["run_id"] == "ensemble-" + "+".join(member["run_id"] for member in grown_members)
    assert [member.get("train_config_changes") for member in grown_members] == [
        None, None, {"epochs": 2}]
    base = [bundle.load(path).model(x, training=False) for path in member_dirs]
    np.testing.assert_allclose(bundle.load(grown).model(x, training=False), (base[0] + 2 * base[1]) / 3,
                               rtol=1e-5, atol=1e-6)

    # statistics recomputed on another machine differ in their last bits: they still combine, others do not
    data = training.training_data(config, *training.prepare(config))
    for factor, combines in ((1 + 1e-7, True), (1 + 1e-3, False)):
        shifted = data | {"mean": data["mean"] * np.float32(factor)}
        if combines:
            training.combine(member_dirs, tmp_path / "shifted", shifted, grown_card)
        else:
            with pytest.raises(bundle.BundleError, match="other data or statistics"):
                training.combine(member_dirs, tmp_path / "shifted", shifted, grown_card)


def test_calibrate_cross_fits_the_temperature_over_voice_folds(tmp_path, feature_cache, generated_corpus,
                                                                local_ray):
    """A target (validation actors 17-20) and a fold model of its recipe holding out actors 1-4: `ser calibrate`
    pools one single-model temperature over both folds, scales the target's by T_all / T_val, and leaves the
    weights alone; overlapping folds and other recipes are refused."""
    from click.testing import CliRunner

    from ser.cli import main

    common = {"data_dir": str(generated_corpus), "protocol": "actors", "num_workers": 1, "epochs": 2,
              "keep": "last", "learning_rate": 0.01}
    target = _smoke_train(tmp_path / "target", feature_cache, **common)
    fold = _smoke_train(tmp_path / "fold", feature_cache, seed=43, validation_actors=(1, 2, 3, 4), **common)
    assert fold["split"] == target["split"] == {"train": 16, "validation": 4, "test": 4}
    assert (target["validation_actors"], fold["validation_actors"]) == ([17, 18, 19, 20], [1, 2, 3, 4])
    paths = {name: tmp_path / name / "bundle" for name in ("target", "fold")} | {
        name: tmp_path / name for name in ("overlap", "other")}

    def calibrate(*args):
        return CliRunner().invoke(main, ["calibrate", str(paths["target"]), *map(str, args)], catch_exceptions=False)

    result = calibrate("--cross-fit", paths["fold"], "--output", tmp_path / "calibrated", "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output)
    fit = entry["cross_fit"]
    assert [row["validation_actors"] for row in fit["folds"]] == [[17, 18, 19, 20], [1, 2, 3, 4]]
    assert entry["validation_temperature"] == pytest.approx(target["calibration"]["temperature"], rel=1e-3)
    assert fit["single_model_temperature_validation_fold"] == fit["folds"][0]["single_model_temperature"]
    fold_temperatures = sorted(row["single_model_temperature"] for row in fit["folds"])
    assert fold_temperatures[0] != pytest.approx(fold_temperatures[1], rel=1e-2)  # what makes the factor move
    assert fold_temperatures[0] < fit["single_model_temperature_all_folds"] < fold_temperatures[1]
    assert entry["temperature"] == pytest.approx(entry["validation_temperature"] * fit["factor"], rel=1e-9)
    assert set(fit["held_out_check"]) == {"one_fold_temperature", "other_folds_temperature"}
    calibrated = bundle.load(tmp_path / "calibrated")
    assert calibrated.temperature == entry["temperature"] and calibrated.card["calibration"] == entry
    assert calibrated.sha256 == bundle.load(paths["target"]).sha256  # the same weights
    assert bundle.read_card(paths["target"])["calibration"] == target["calibration"]  # the original is untouched

    for name, change in (("overlap", {"validation_actors": [4, 5, 6, 7]}), ("other", {"learning_rate": 0.1})):
        shutil.copytree(paths["fold"], paths[name])  # what cross-fitting reads of a fold is its card's recipe
        card = bundle.read_card(paths[name])
        bundle.write_card(paths[name], card | {"train_config": card["train_config"] | change})
    result = calibrate("--cross-fit", paths["fold"], "--cross-fit", paths["overlap"])
    assert result.exit_code == 2 and "folds must not overlap" in result.stderr
    result = calibrate("--cross-fit", paths["other"])
    assert result.exit_code == 2 and "differs in ['learning_rate']" in result.stderr


def test_checkpoint_averaging_validates_and_ships_the_average(tmp_path, feature_cache, generated_corpus,
                                                              local_ray):
    """average_checkpoints=2 against a plain run of the same seed: the same training losses (training goes on
    from each epoch's own weights, not from the average), the same first validation (an average of one), a
    different second one (the mean of epochs 1 and 2), and each ships exactly the weights it validated best."""
    common = {"data_dir": str(generated_corpus), "protocol": "actors", "num_workers": 1, "patience": 5, "epochs": 3,
              "learning_rate": 0.01}  # big steps: the mean of two epochs is far from either
    raw = _smoke_train(tmp_path / "raw", feature_cache, **common)
    averaged = _smoke_train(tmp_path / "avg", feature_cache, average_checkpoints=2, **common)
    losses = [[row["train_loss"] for row in run["history"]] for run in (raw, averaged)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert averaged["history"][0]["val_nll"] == pytest.approx(raw["history"][0]["val_nll"], rel=1e-4)
    assert averaged["history"][1]["val_nll"] != pytest.approx(raw["history"][1]["val_nll"], rel=1e-3)
    for run in (raw, averaged):
        validated = run["history"][run["best_epoch"] - 1]["val_nll"]
        assert run["validation"]["before_calibration"]["nll"] == pytest.approx(validated, rel=1e-5)


def test_keep_last_ships_the_final_epoch_whatever_validation_says(tmp_path, feature_cache, generated_corpus,
                                                                 local_ray):
    """keep=last against keep=best on the same seed: the same epochs, but no early stopping (patience 1 would
    stop the plain run) and the bundle is the final epoch, where the plain run keeps a better-validated one."""
    common = {"data_dir": str(generated_corpus), "protocol": "actors", "num_workers": 1, "epochs": 3,
              "learning_rate": 0.01}
    best = _smoke_train(tmp_path / "best", feature_cache, patience=5, **common)
    last = _smoke_train(tmp_path / "last", feature_cache, patience=1, keep="last", **common)
    assert best["best_epoch"] < 3  # the precondition that makes the two runs differ
    assert last["best_epoch"] == 3
    for run in (best, last):
        validated = run["history"][run["best_epoch"] - 1]["val_nll"]
        assert run["validation"]["before_calibration"]["nll"] == pytest.approx(validated, rel=1e-5)
    assert [r["val_nll"] for r in last["history"]] == pytest.approx([r["val_nll"] for r in best["history"]], rel=1e-4)


def test_perturbed_copies_train_but_never_validate_or_normalize(tmp_path, feature_cache, generated_corpus,
                                                                 local_ray):
    """augment.speeds and augment.pitch_shifts append perturbed copies of every file, in that order: training
    epochs draw from them, while the normalization statistics and validation (early stopping, calibration) see
    the original audio only."""
    plain = training.TrainConfig(data_dir=str(generated_corpus), protocol="actors", cache_dir=str(feature_cache),
                                 normalization="per_band")
    perturbed = dataclasses.replace(plain, augment=training.AugmentConfig(speeds=(0.9, 1.1), pitch_shifts=(3,)))
    table, original = training.prepare(plain)
    _, stacked = training.prepare(perturbed)
    n = stacked.n_original
    assert n == len(original.features) and len(stacked.features) > 3 * n
    np.testing.assert_array_equal(stacked.features[:n], original.features)
    assert set(stacked.file_index[n:]) == set(original.file_index)  # every file, every copy
    shifted = [features.file_features(path, audio.Perturbation(semitones=3))[0] for path in table["path"]]
    np.testing.assert_array_equal(stacked.features[-sum(map(len, shifted)) :], np.concatenate(shifted))  # the last
    data, reference = training.training_data(perturbed, table, stacked), training.training_data(plain, table, original)
    np.testing.assert_array_equal(data["mean"], reference["mean"])
    np.testing.assert_array_equal(data["std"], reference["std"])
    for got, want in zip(training.validation_view(data), training.validation_view(reference), strict=True):
        np.testing.assert_array_equal(got, want)
    train = training.training_windows(data)
    assert (~data["original"][train]).sum() > 0 and set(data["file_index"][train]) == set(
        reference["file_index"][training.training_windows(reference)])
    with pytest.raises(ValueError, match=r"augment\.speeds"):
        training.TrainConfig(augment=training.AugmentConfig(speeds=(1.0,)))
    with pytest.raises(ValueError, match=r"augment\.pitch_shifts"):
        training.TrainConfig(augment=training.AugmentConfig(pitch_shifts=(0,)))


TONE_HZ = 440.0


def _tone(seconds: float = 2.0) -> np.ndarray:
    """A pure TONE_HZ sine at the project's rate: its one spectral peak shows where perturbation moves the pitch."""
    return np.sin(2 * np.pi * TONE_HZ * np.arange(int(audio.SAMPLE_RATE * seconds)) / audio.SAMPLE_RATE).astype(
        np.float32)


def test_speed_perturbation_changes_tempo_and_pitch_together():
    rate, tone, clip = audio.SAMPLE_RATE, TONE_HZ, _tone()
    assert audio.change_speed(clip, 1.0) is clip
    faster = audio.change_speed(clip, 1.1)
    assert faster.dtype == np.float32 and len(faster) == pytest.approx(len(clip) / 1.1, abs=2)
    peak = np.fft.rfftfreq(len(faster), 1 / rate)[np.abs(np.fft.rfft(faster)).argmax()]
    assert peak == pytest.approx(tone * 1.1, abs=1.0)


def test_pitch_perturbation_moves_the_pitch_and_keeps_the_tempo():
    """librosa.effects.pitch_shift's result, composed from the project's own resampling."""
    import librosa

    rate, tone, clip = audio.SAMPLE_RATE, TONE_HZ, _tone()
    assert audio.shift_pitch(clip, 0) is clip
    for semitones in (-3, 3):
        shifted = audio.shift_pitch(clip, semitones)
        assert shifted.dtype == np.float32 and len(shifted) == len(clip)
        peak = np.fft.rfftfreq(len(shifted), 1 / rate)[np.abs(np.fft.rfft(shifted)).argmax()]
        assert peak == pytest.approx(tone * 2 ** (semitones / 12), abs=1.0)
        reference = librosa.effects.pitch_shift(clip, sr=rate, n_steps=semitones, res_type=audio.RESAMPLE_TYPE)
        np.testing.assert_allclose(shifted, reference, atol=1e-6)


def test_distillation_blends_the_teachers_probabilities_into_the_targets(tmp_path, feature_cache,
                                                                         generated_corpus, local_ray):
    """distill_from: the targets of every training window blend its label with the teacher's probabilities at
    distill_temperature (so training differs from a plain run of the same seed), the card names the teacher,
    and a teacher of another protocol's split is refused."""
    common = {"data_dir": str(generated_corpus), "protocol": "actors", "num_workers": 1, "epochs": 2}
    plain = _smoke_train(tmp_path / "teacher", feature_cache, **common)
    teacher = tmp_path / "teacher" / "bundle"
    loaded = bundle.load(teacher)
    student = _smoke_train(tmp_path / "student", feature_cache, distill_from=str(teacher), distill_weight=0.5,
                           distill_temperature=3.0, **common)
    assert student["distillation"] == {"teacher": plain["name"], "teacher_run_id": plain["run_id"],
                                       "teacher_sha256": loaded.sha256, "weight": 0.5,
                                       "temperature": 3.0}
    assert student["history"][0]["train_loss"] != pytest.approx(plain["history"][0]["train_loss"], rel=1e-3)

    config = training.TrainConfig(distill_from=str(teacher), distill_temperature=3.0, cache_dir=str(feature_cache),
                                  **common, model=ModelConfig(conv_filters=(4, 8, 8), lstm_units=8))
    table, feature_set = training.prepare(config)
    data = training.training_data(config, table, feature_set)
    fingerprint = training.data_fingerprint(table)
    soft, _ = training.teacher_targets(config, fingerprint, data)
    train = training.training_windows(data)
    logits = loaded.model(normalize(data["features"][train], loaded.mean, loaded.std), training=False).numpy()
    np.testing.assert_allclose(soft[train], softmax(logits, 3.0), rtol=1e-4, atol=1e-6)
    assert not soft[np.setdiff1d(np.arange(len(soft)), train)].any()  # no target outside the training files

    other = dataclasses.replace(config, protocol="seed")
    with pytest.raises(bundle.BundleError, match="same data"):
        training.teacher_targets(other, fingerprint, data)
    with pytest.raises(ValueError, match="distill_weight"):
        training.TrainConfig(distill_weight=0.0)
    with pytest.raises(ValueError, match="distill_temperature"):
        training.TrainConfig(distill_temperature=0.0)
