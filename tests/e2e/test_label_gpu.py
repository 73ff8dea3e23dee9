"""Actor settings: GPUs per actor, GPUs the cluster lacks (an error, not a hang), pool size and layout."""

from __future__ import annotations

import pytest
from conftest import write_audio

from e2e.conftest import ser
from ser import pipeline

MORE_GPUS_THAN_ANY_MACHINE = 64


def _inference(num_gpus: float | None, min_actors: int = 1) -> pipeline.InferenceConfig:
    return pipeline.InferenceConfig(num_gpus=num_gpus, min_actors=min_actors, max_actors=min_actors)


@pytest.mark.parametrize(
    ("num_gpus", "min_actors", "cluster_gpus", "expected"),
    [(None, 1, 0, 0.0), (None, 1, 4, 1.0), (0.0, 1, 0, 0.0), (0.5, 2, 1, 0.5), (1.0, 2, 2, 1.0)],
)
def test_gpus_per_actor(num_gpus, min_actors, cluster_gpus, expected):
    assert pipeline.inference_gpus(_inference(num_gpus, min_actors), cluster_gpus) == expected


@pytest.mark.parametrize(("num_gpus", "min_actors", "cluster_gpus"), [(1.0, 1, 0), (0.5, 1, 0), (1.0, 2, 1)])
def test_more_gpus_than_the_cluster_has_is_an_input_error(num_gpus, min_actors, cluster_gpus):
    with pytest.raises(pipeline.InputError, match=r"inference\.num_gpus=.* needs .* GPUs, but the cluster has"):
        pipeline.inference_gpus(_inference(num_gpus, min_actors), cluster_gpus)


@pytest.mark.timeout(240)
def test_label_asking_for_missing_gpus_fails_fast_with_one_line(tmp_path, tiny_bundle):
    write_audio(tmp_path / "in" / "clip.wav", 2.0)
    actors = f"{MORE_GPUS_THAN_ANY_MACHINE}"
    done = ser("label", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(tiny_bundle),
               "--no-progress", "--set", "inference.num_gpus=1", "--set", f"inference.min_actors={actors}",
               "--set", f"inference.max_actors={actors}", timeout=230)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: inference.num_gpus=1 with min_actors={actors} needs {actors} GPUs" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("fused", "gpus", "cpus", "blocks", "configured", "expected"), [
    (True, 0.0, 2, 100, (None, None), (2, 2)),  # fused on CPU: one actor per CPU ...
    (True, 0.0, 16, 3, (None, None), (3, 3)),  # ... but no more than there are input blocks
    (False, 0.0, 16, 100, (None, None), (1, 1)),  # split: one scoring actor fed by decode tasks
    (True, 1.0, 16, 100, (None, None), (1, 1)),  # GPU actors: one (each holds a GPU)
    (True, 0.0, 8, 100, (2, None), (2, 8)),  # a configured minimum may grow to one per CPU
    (True, 0.0, 8, 100, (None, 3), (3, 3)),  # a configured maximum caps the default
    (False, 0.0, 8, 100, (1, 4), (1, 4)),
])
def test_actor_pool_size(fused, gpus, cpus, blocks, configured, expected):
    cfg = pipeline.InferenceConfig(min_actors=configured[0], max_actors=configured[1])
    assert pipeline.pool_size(cfg, fused, gpus, cpus, blocks) == expected


def test_actors_decode_too_by_default_only_without_gpus():
    assert pipeline.fuses(pipeline.LabelConfig(), 0.0) and not pipeline.fuses(pipeline.LabelConfig(), 1.0)
    assert not pipeline.fuses(pipeline.LabelConfig(fused=False), 0.0)
    assert pipeline.fuses(pipeline.LabelConfig(fused=True), 1.0)
