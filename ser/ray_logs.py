"""Ray worker-process setup that keeps Ray's own chatter out of `ser train`'s progress output.

Every worker process of the Ray job `ser train` starts runs `quiet_workers` first; it imports nothing the worker
has not already imported.
"""

from __future__ import annotations

import logging
import os

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
