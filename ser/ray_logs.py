"""The local Ray that `ser train` starts: safe beside other Rays on the machine, and quiet.

Every worker process of that Ray job runs `quiet_workers` first, which keeps Ray's own chatter out of the
progress output; it imports nothing the worker has not already imported.
"""

from __future__ import annotations

import logging
import os
import socket

# Ray Train's detached placement-group cleaner asks the state API once a second whether the training controller
# is alive. The state API is served by the dashboard, which `ser train` does not start, so each ask fails and logs a
# warning: about 6,500 lines over a 2-hour training. A failed ask changes nothing (the cleaner keeps watching,
# and a run that ends normally removes its placement group itself), so this logger is kept to errors.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# Each training worker logs every report it sends ("Reporting training result N: TrainingReport(...)", a few
# hundred characters an epoch) at INFO. That logger is named by its module's file path (`getLogger(__file__)`),
# not under `ray.train`, so Ray Train's own LoggingConfig does not reach it.
REPORT_LOGGER_FILE = os.path.join("train", "v2", "_internal", "execution", "context.py")  # in the ray package
SETUP_HOOK = f"{__name__}.quiet_workers"  # for runtime_env["worker_process_setup_hook"]


def quiet_workers() -> None:
    """Worker-process setup hook: silence the two loggers above, nothing else.

    It also tells the state API which cluster to ask: left to find one, it fails with a traceback when another
    Ray instance runs on the same machine (two trainings side by side).
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    logging.getLogger(os.path.join(os.path.dirname(ray.__file__), REPORT_LOGGER_FILE)).setLevel(logging.WARNING)


def local_ray_options() -> dict:
    """`ray.init` options for a local Ray that runs Ray Train: no dashboard, `quiet_workers`, and a dashboard
    address of its own, a free port where nothing answers.

    Ray Train's placement-group cleaner asks the dashboard address the cluster advertises whether the training
    controller is alive. Without a dashboard that address is still 127.0.0.1:8265, so when any other Ray on the
    machine serves its dashboard there, the cleaner asks that one, which has never heard of our controller, takes
    the controller for dead and removes the training's placement group: the training dies. (Seen: a 2-hour
    training killed by a test suite's Ray started beside it.) Asking a port where nothing answers fails like
    asking no dashboard at all, which the cleaner shrugs off."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"include_dashboard": False, "dashboard_port": port,
            "runtime_env": {"worker_process_setup_hook": SETUP_HOOK}}
