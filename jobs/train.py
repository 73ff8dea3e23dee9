"""Ray job entry for training: `ray job submit --working-dir . -- python -m jobs.train --config configs/train.yaml`.

The same options as `ser train`; inside a submitted job Ray connects to the job's cluster automatically.
"""

from ser.cli import train

if __name__ == "__main__":
    train(prog_name="python -m jobs.train")
