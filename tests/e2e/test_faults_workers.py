"""Ray workers dying mid-run: a decode task's worker and the inference actor are SIGKILLed while the job runs.

Ray Data runs the lost decode task again and restarts the actor, which runs its lost batches again; the job
finishes and every input is in the output exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
from conftest import write_audio

from e2e.conftest import read_output
from e2e.faults import titled
from ser import pipeline, store

N_FILES = 24
DECODE_TITLE = "ray::MapBatches(featurize)"  # a worker process while it runs a decode task
ACTOR_TITLE = "ray::MapWorker(MapBatches(PredictorActor))"  # the inference actor's process
POLL_S = 0.02
WAIT_S = 300


class Killer(threading.Thread):
    """SIGKILLs a worker in the middle of a decode task, then the inference actor once a part is committed."""

    def __init__(self, out):
        super().__init__(daemon=True)
        self.out = out
        self.killed: dict[str, int] = {}
        self.committed_at_kill: dict[str, int] = {}
        self.actors_seen: set[int] = set()
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def _committed(self) -> int:
        manifests = list((self.out / "_runs").glob("*.json"))
        return json.loads(manifests[0].read_text())["counts"]["ok"] if manifests else 0

    def _kill_first(self, title: str, ready=lambda: True) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not self.finished.is_set():
            self.actors_seen.update(p.pid for p in titled(ACTOR_TITLE))
            found = titled(title) if ready() else []
            if found:
                self.committed_at_kill[title] = self._committed()
                os.kill(found[0].pid, signal.SIGKILL)
                self.killed[title] = found[0].pid
                return
            time.sleep(POLL_S)

    def run(self) -> None:
        try:
            self._kill_first(DECODE_TITLE)
            self._kill_first(ACTOR_TITLE, ready=lambda: self._committed() > 0)
            while not self.finished.wait(POLL_S * 10):  # note the actor that replaces the killed one
                self.actors_seen.update(p.pid for p in titled(ACTOR_TITLE))
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_killed_decode_worker_and_inference_actor_lose_nothing(tmp_path, tiny_bundle, local_ray):
    folder, out = tmp_path / "in", tmp_path / "out"
    for i in range(N_FILES):
        write_audio(folder / f"clip{i:02d}.wav", 6.0, seed=i)
    cfg = pipeline.LabelConfig(input=str(folder), output=str(out), model=str(tiny_bundle), progress=False,
                               commit_every=2, decode=pipeline.DecodeConfig(batch_size=2),
                               inference=pipeline.InferenceConfig(batch_size=2))
    killer = Killer(out)
    killer.start()
    try:
        manifest = pipeline.run(cfg)
    finally:
        killer.finished.set()
        killer.join()
    assert killer.error is None, killer.error
    assert set(killer.killed) == {DECODE_TITLE, ACTOR_TITLE}, f"not killed mid-run: {killer.killed}"
    assert killer.committed_at_kill[ACTOR_TITLE] < N_FILES  # the actor died with work left

    frame = read_output(out)  # no path twice
    assert sorted(frame["path"]) == sorted(str(p) for p in folder.iterdir())
    assert (frame["status"] == "ok").all(), frame["error"].dropna().tolist()
    np.testing.assert_allclose(frame[list(store.PROB_COLUMNS)].sum(axis=1), 1.0, atol=1e-9)
    assert manifest["status"] == "completed" and manifest["counts"]["ok"] == N_FILES
    assert killer.actors_seen - {killer.killed[ACTOR_TITLE]}, "no inference actor replaced the killed one"
