"""Make the example clips shipped in examples/ (synthetic speech from espeak-ng; no corpus audio).

Run from the repository root: `python scripts/make_examples.py` (needs the `espeak-ng` program).
Each clip exercises one input path of the tool: formats, rates, channels, and a long recording.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent.parent / "examples"

# name, text, espeak-ng voice, words per minute, pitch (0-99), output rate, channels
CLIPS = [
    ("kids-talking-calm.wav", "Kids are talking by the door.", "en-us", 130, 35, 22050, 1),
    ("dogs-sitting-bright.flac", "Dogs are sitting by the door!", "en-us+f3", 190, 80, 48000, 2),
    ("question-low.ogg", "Are the dogs sitting by the door?", "en-gb", 110, 20, 16000, 1),
    ("statement-fast.mp3", "Kids are talking by the door, and the dogs are sitting.", "en-us+m3", 220, 60, 44100, 1),
    (
        "long-reading.wav",
        "The kids are talking by the door. The dogs are sitting by the door. "
        "Nobody expected the storm to arrive so early this year, and everyone ran inside. "
        "Then the sun came out again, and the children went back to play in the garden.",
        "en-us",
        150,
        50,
        22050,
        1,
    ),
]


def speak(text: str, voice: str, wpm: int, pitch: int) -> tuple[np.ndarray, int]:
    """Synthesize `text` with espeak-ng; returns mono float32 and its sample rate."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch), "-w", wav.name, text], check=True)
        samples, rate = sf.read(wav.name, dtype="float32")
    return samples, rate


def main() -> None:
    for name, text, voice, wpm, pitch, rate, channels in CLIPS:
        samples, source_rate = speak(text, voice, wpm, pitch)
        samples = librosa.resample(samples, orig_sr=source_rate, target_sr=rate)
        samples = 0.5 * samples / np.abs(samples).max()
        data = np.repeat(samples[:, None], channels, axis=1)
        fmt = "MP3" if name.endswith(".mp3") else None
        sf.write(HERE / name, data, rate, format=fmt)
        print(f"{name}: {len(samples) / rate:.1f} s, {rate} Hz, {channels} ch")


if __name__ == "__main__":
    main()
