"""The web demo: upload or record a clip, see the predicted emotion, its calibrated confidence and every class.

Start it with `ser app` (or `streamlit run ser/app.py`); the model folder comes from $SER_MODEL, else the
shipped default. It runs the same `Predictor` as `ser predict` and the labeling job.
"""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from ser import audio, bundle
from ser.predict import FilePrediction, Predictor

MODEL_ENV = "SER_MODEL"
UPLOAD_TYPES = ["wav", "flac", "ogg", "mp3"]
TITLE = "Speech emotion recognition"


@st.cache_resource(show_spinner="Loading the model…")
def load_predictor(model_dir: str) -> Predictor:
    """One Predictor per model folder for the whole server (TensorFlow loads once)."""
    return Predictor(model_dir)


def probability_table(prediction: FilePrediction) -> pd.DataFrame:
    """Class probabilities in model order, indexed by emotion."""
    return pd.DataFrame({"probability": prediction.probabilities}).rename_axis("emotion")


def timeline_table(prediction: FilePrediction) -> pd.DataFrame:
    """Per-window probabilities (rows: window start in seconds, columns: emotions)."""
    frame = pd.DataFrame(prediction.window_probabilities, columns=list(prediction.probabilities))
    return frame.set_axis(pd.Index(prediction.window_starts, name="window start (s)"))


def show_prediction(prediction: FilePrediction) -> None:
    """Label and confidence, the eight probabilities (chart and table), and the per-window timeline."""
    label, confidence = st.columns(2)
    label.metric("Predicted emotion", prediction.label)
    confidence.metric("Calibrated confidence", f"{prediction.confidence:.1%}")
    probabilities = probability_table(prediction)
    st.subheader("Class probabilities")
    st.bar_chart(probabilities, horizontal=True, sort=False, x_label="", y_label="probability")
    st.table(probabilities.style.format("{:.1%}"))
    if len(prediction.window_starts) > 1:
        st.subheader("Timeline")
        st.caption(f"{len(prediction.window_starts)} windows of {audio.CLIP_SECONDS} s, every "
                   f"{audio.WINDOW_HOP_SECONDS} s; the label above is their mean.")
        st.line_chart(timeline_table(prediction), x_label="window start (s)", y_label="probability")


def main() -> None:
    """The page: load the model, take a clip from the upload or the recorder, show its prediction."""
    st.set_page_config(page_title=TITLE, page_icon="🎙️")
    st.title(TITLE)
    model_dir = os.environ.get(MODEL_ENV, str(bundle.DEFAULT_MODEL))
    try:
        predictor = load_predictor(model_dir)
    except bundle.BundleError as exc:
        st.error(f"Cannot load the model: {exc}")
        st.stop()
    st.caption(f"Model {predictor.bundle.name} · emotions: {', '.join(predictor.classes)}. "
               f"{predictor.bundle.card.get('licence', '')}")
    upload_tab, record_tab = st.tabs(["Upload a file", "Record"])
    uploaded = upload_tab.file_uploader("Audio file", type=UPLOAD_TYPES)
    recorded = record_tab.audio_input("Record a clip")
    clip = uploaded or recorded
    if clip is None:
        st.info("Upload a clip (wav, flac, ogg, mp3) or record one to see its emotion.")
        return
    st.audio(clip)
    try:
        prediction = predictor.predict_file(clip.getvalue(), clip.name)
    except audio.DecodeError as exc:
        st.error(f"{clip.name}: {exc}")
        return
    show_prediction(prediction)


if __name__ == "__main__":
    main()
