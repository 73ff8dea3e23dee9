"""Ray workers dying mid-run, in both layouts of the job.

Split (decode tasks feed a scoring actor, as on GPU clusters): a decode task's worker and the inference actor
are SIGKILLed while the job runs. Fused (actors decode and score, the CPU default): an actor is SIGKILLed in
the middle of a call, and another once a part is committed. Ray Data runs the lost work again and restarts
the actors; the job finishes and every input is in the output exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import write_audio

from e2e.conftest import read_output
from e2e.faults import titled
from ser import pipeline, store

N_FILES = 24
DECODE_TITLE = "ray::MapBatches(featurize)"  # a worker process while it runs a decode task
ACTOR_TITLE = "ray::MapWorker(MapBatches(PredictorActor))"  # the inference actor's process
FUSED_TITLE = "ray::MapWorker(MapBatches(FusedActor))"  # a fused actor's process ...
FUSED_BUSY_TITLE = FUSED_TITLE + ".submit"  # ... while it runs a call
POLL_S = 0.02
WAIT_S = 300


class Killer(threading.Thread):
    """SIGKILLs a process busy with a call (a decode task, or a fused actor), then an actor once a part is
    committed."""

    def __init__(self, out, busy_title: str, actor_title: str):
        super().__init__(daemon=True)
        self.out, self.busy_title, self.actor_title = out, busy_title, actor_title
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
            self.actors_seen.update(p.pid for p in titled(self.actor_title))
            found = titled(title) if ready() else []
            if found:
                self.committed_at_kill[title] = self._committed()
                os.kill(found[0].pid, signal.SIGKILL)
                self.killed[title] = found[0].pid
                return
            time.sleep(POLL_S)

    def run(self) -> None:
        try:
            self._kill_first(self.busy_title)
            self._kill_first(self.actor_title, ready=lambda: self._committed() > 0)
            while not self.finished.wait(POLL_S * 10):  # note the actor that replaces the killed one
                self.actors_seen.update(p.pid for p in titled(self.actor_title))
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.mark.parametrize(("fused", "busy_title", "actor_title"), [
    (False, DECODE_TITLE, ACTOR_TITLE),
    (True, FUSED_BUSY_TITLE, FUSED_TITLE),
], ids=["split", "fused"])
def test_killed_workers_and_actors_lose_nothing(tmp_path, tiny_bundle, local_ray, fused, busy_title, actor_title):
    folder, out = tmp_path / "in", tmp_path / "out"
    for i in range(N_FILES):
        write_audio(folder / f"clip{i:02d}.wav", 6.0, seed=i)
    cfg = pipeline.LabelConfig(input=str(folder), output=str(out), model=str(tiny_bundle), progress=False,
                               commit_every=2, fused=fused, decode=pipeline.DecodeConfig(batch_size=2),
                               inference=pipeline.InferenceConfig(batch_size=2, min_actors=1, max_actors=1))
    killer = Killer(out, busy_title, actor_title)
    killer.start()
    try:
        manifest = pipeline.run(cfg)
    finally:
        killer.finished.set()
        killer.join()
    assert killer.error is None, killer.error
    assert set(killer.killed) == {busy_title, actor_title}, f"not killed mid-run: {killer.killed}"
    assert killer.committed_at_kill[actor_title] < N_FILES  # the actor died with work left

    frame = read_output(out)  # no path twice
    assert sorted(frame["path"]) == sorted(str(p) for p in folder.iterdir())
    assert (frame["status"] == "ok").all(), frame["error"].dropna().tolist()
    np.testing.assert_allclose(frame[list(store.PROB_COLUMNS)].sum(axis=1), 1.0, atol=1e-9)
    assert manifest["status"] == "completed" and manifest["counts"]["ok"] == N_FILES
    assert killer.actors_seen - set(killer.killed.values()), "no actor replaced the killed one"
