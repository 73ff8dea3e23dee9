"""Ray job entry for labeling: `ray job submit --working-dir . -- python -m jobs.label INPUT --output OUT`.

The same options as `ser label`; inside a submitted job RAY_ADDRESS is set, so the job joins that cluster.
"""

from ser.cli import label

if __name__ == "__main__":
    label(prog_name="python -m jobs.label")
