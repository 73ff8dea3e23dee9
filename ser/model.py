"""The model: CNN -> BiLSTM -> Attention over a normalized 128x128 log-mel, emitting class logits.

Softmax (with the calibrated temperature) is applied by `ser.predict`, never inside the graph, so that
training uses logits and every inference path applies the same temperature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
from keras import layers

from ser import features


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters (the original notebook's values by default)."""

    n_classes: int = 8
    conv_filters: tuple[int, ...] = (32, 64, 128)
    conv_dropout: float = 0.2
    lstm_units: int = 128
    head_dropout: float = 0.3
    instance_norm: bool = False  # standardize each input per mel band over its own frames (speaker robustness)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        values = dict(values)
        values["conv_filters"] = tuple(values.get("conv_filters", cls.conv_filters))
        return cls(**values)


@keras.saving.register_keras_serializable(package="ser")
class Attention(layers.Layer):
    """Additive attention pooling over time: (batch, time, dim) -> (batch, dim)."""

    def build(self, input_shape):
        dim = input_shape[-1]
        self.score_dense = layers.Dense(dim, activation="tanh", name="score_hidden")
        self.score_dense.build(input_shape)
        self.score_vector = layers.Dense(1, use_bias=False, name="score")
        self.score_vector.build((*input_shape[:-1], dim))
        super().build(input_shape)

    def call(self, inputs):
        weights = keras.ops.softmax(self.score_vector(self.score_dense(inputs)), axis=1)
        return keras.ops.sum(weights * inputs, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package="ser")
class InstanceNorm(layers.Layer):
    """Per-utterance normalization: each sample's mel bands to zero mean, unit variance over its own frames.

    Removes what is constant within a recording (the speaker's and the channel's spectral envelope), the
    cepstral mean and variance normalization of speech recognition, inside the graph so every inference
    path applies it.
    """

    epsilon = 1e-3

    def call(self, inputs):
        mean = keras.ops.mean(inputs, axis=2, keepdims=True)
        variance = keras.ops.var(inputs, axis=2, keepdims=True)
        return (inputs - mean) / keras.ops.sqrt(variance + self.epsilon)


def build_model(config: ModelConfig = ModelConfig()) -> keras.Model:
    """[InstanceNorm], then Conv2D -> MaxPool -> BatchNorm -> Dropout (x3), BiLSTM over time, Attention,
    Dropout, Dense logits."""
    inputs = keras.Input(shape=(*features.FEATURE_SHAPE, 1), name="log_mel")
    x = InstanceNorm(name="instance_norm")(inputs) if config.instance_norm else inputs
    for filters in config.conv_filters:
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Dropout(config.conv_dropout)(x)
    # (mels, frames, channels) -> (frames, mels * channels): the LSTM reads the spectrogram along time.
    x = layers.Permute((2, 1, 3))(x)
    x = layers.Reshape((x.shape[1], x.shape[2] * x.shape[3]))(x)
    x = layers.Bidirectional(layers.LSTM(config.lstm_units, return_sequences=True))(x)
    x = Attention(name="attention")(x)
    x = layers.Dropout(config.head_dropout)(x)
    logits = layers.Dense(config.n_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="ser_cnn_bilstm_attention")


def average_logits(members: list[keras.Model]) -> keras.Model:
    """An ensemble as one model: the same input through every member, their logits averaged."""
    inputs = keras.Input(shape=(*features.FEATURE_SHAPE, 1), name="log_mel")
    outputs = []
    for i, member in enumerate(members):
        member.name = f"member_{i}"  # nested models need unique names to be saved
        outputs.append(member(inputs))
    logits = layers.Average(name="mean_logits")(outputs) if len(outputs) > 1 else outputs[0]
    return keras.Model(inputs, logits, name=f"ensemble_of_{len(members)}")
