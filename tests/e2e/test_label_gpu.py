"""GPU settings of the inference actors: how many each gets, and GPUs the cluster lacks (an error, not a hang)."""

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
