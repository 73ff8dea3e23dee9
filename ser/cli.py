"""The `ser` command line. Heavy imports (TensorFlow, Ray) happen inside commands so `--help` is instant."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ser import __version__, bundle, ravdess

DEFAULT_DATA = "../shared/data/ravdess"


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _load_predictor(model: Path):
    """A Predictor for `model`, or a one-line error and exit 2."""
    _quiet_tensorflow()
    from ser.predict import Predictor

    try:
        return Predictor(model)
    except bundle.BundleError as exc:
        _fail(str(exc))


model_option = click.option(
    "--model",
    "model",
    type=click.Path(path_type=Path),
    default=bundle.DEFAULT_MODEL,
    show_default="models/ravdess-actors",
    help="Model bundle folder (model.keras, train_mean.npy, train_std.npy, model.json).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="ser")
def main() -> None:
    """Speech emotion recognition for whole audio collections.

    \b
    Label a collection:   ser label RECORDINGS --output OUT      (Ray; local or a cluster)
    Label a few files:    ser predict a.wav b.flac
    Train a model:        ser train --config configs/train.yaml   (Ray Train)
    Score a model:        ser evaluate --model models/ravdess-seed --protocol seed

    Emotions: neutral, calm, happy, sad, angry, fearful, disgust, surprised. The shipped models are trained
    on RAVDESS (CC BY-NC-SA 4.0, https://zenodo.org/records/1188976): non-commercial use only.
    """


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str))
@model_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file per line (errors included).")
def predict(files: tuple[str, ...], model: Path, as_json: bool) -> None:
    """Predict the emotion of each audio FILE (wav, flac, ogg, mp3; any rate, any length).

    Files longer than 3 s are cut into 3 s windows (hop 1.5 s) and labelled by the mean of the window
    probabilities. Confidences are calibrated probabilities. Unreadable files are reported on stderr, the
    others are still predicted, and the exit code is 1 if any file failed.
    """
    from ser.audio import DecodeError

    predictor = _load_predictor(model)
    failed = 0
    for result in predictor.predict_files(files):
        if isinstance(result, DecodeError):
            failed += 1
            click.echo(f"error: {result}", err=True)
            if as_json:
                path, _, reason = str(result).partition(": ")
                click.echo(json.dumps({"path": path, "status": "error", "error": reason}))
            continue
        if as_json:
            click.echo(json.dumps({**result.to_dict(), "status": "ok", "model": predictor.bundle.name}))
            continue
        line = f"Predicted Emotion: {result.label} (Confidence: {result.confidence:.2f})"
        click.echo(f"{result.path}: {line}" if len(files) > 1 else line)
    sys.exit(1 if failed else 0)


@main.command()
@model_option
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True,
              help=f"RAVDESS folder (get it from {ravdess.ZENODO_URL}).")
@click.option("--protocol", type=click.Choice(ravdess.PROTOCOLS), default=None,
              help="Split to test on [default: the protocol the model was trained with].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with all metrics.")
@click.option("--html", "html", type=click.Path(path_type=Path), default=None, help="Also write an HTML report here.")
@click.option("--record", is_flag=True, help="Store the test metrics in the bundle's model.json (model card).")
def evaluate(model: Path, data_dir: Path, protocol: str | None, as_json: bool, html: Path | None, record: bool) -> None:
    """Score a model on a RAVDESS protocol's test split.

    Reports accuracy, macro-F1, weighted F1, per-class precision/recall/F1, the confusion matrix and the
    expected calibration error (15 bins), before and after the bundle's temperature scaling. The test split
    is only ever touched here.
    """
    from ser.evaluate import evaluate as run_evaluation

    predictor = _load_predictor(model)
    protocol = protocol or predictor.bundle.card.get("protocol", "seed")
    try:
        result = run_evaluation(predictor, data_dir, protocol)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if record:
        card = bundle.read_card(model)
        card.setdefault("test", {})[protocol] = {k: v for k, v in result.items() if k != "reliability"}
        bundle.write_card(model, card)
    if html:
        from ser.report import evaluation_html

        html.write_text(evaluation_html(result, predictor.classes))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(_evaluation_table(result, predictor.classes))
    if html:
        click.echo(f"report: {html}")


def _evaluation_table(result: dict, classes: tuple[str, ...]) -> str:
    lines = [
        f"model {result['model']}  protocol {result['protocol']}  test files {result['n']}",
        f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  weighted-F1 {result['weighted_f1']:.4f}",
        f"ECE (15 bins) {result['ece']:.4f} at temperature {result['temperature']:.3f} "
        f"(uncalibrated {result['ece_uncalibrated']:.4f})",
        "",
        f"{'class':<10} {'precision':>9} {'recall':>7} {'f1':>7} {'n':>5}",
    ]
    for name, row in result["per_class"].items():
        lines.append(f"{name:<10} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>7.3f} {row['support']:>5}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)", " " * 10 + "".join(f"{c[:6]:>7}" for c in classes)]
    for name, row in zip(classes, result["confusion_matrix"], strict=True):
        lines.append(f"{name:<10}" + "".join(f"{v:>7}" for v in row))
    return "\n".join(lines)


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="YAML config (see configs/train.yaml for every key and its default).")
@click.option("--protocol", type=click.Choice(ravdess.PROTOCOLS), default=None, help="Split protocol.")
@click.option("--data", "data_dir", default=None, help="RAVDESS folder.")
@click.option("--output", default=None, help="Bundle folder to write ({protocol} and {run_id} are filled in).")
@click.option("--num-workers", type=int, default=None, help="Ray Train workers.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs (early stopping may end sooner).")
@click.option("--seed", type=int, default=None, help="Random seed.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. augment.noise_std=0.2.")
@click.option("--address", default=None, envvar="RAY_ADDRESS", help="Ray cluster address [default: start local Ray].")
@click.option("--print-config", is_flag=True, help="Print the effective config and exit.")
def train(config_path, protocol, data_dir, output, num_workers, epochs, seed, overrides, address, print_config) -> None:
    """Train a model with Ray Train over the shared feature stage and write a bundle.

    Features are extracted once with Ray Data and cached; each worker runs the original recipe with a
    custom distributed step; the best epoch on validation is kept and its temperature is fitted on
    validation. Evaluate the result with `ser evaluate --model OUTPUT`.
    """
    from ser import config as config_io
    from ser.training import TrainConfig

    try:
        cfg = config_io.load(TrainConfig, config_path, overrides, protocol=protocol, data_dir=data_dir,
                             output=output, num_workers=num_workers, epochs=epochs, seed=seed)
    except (config_io.ConfigError, ValueError) as exc:
        _fail(str(exc))
    if print_config:
        click.echo(config_io.dump(cfg), nl=False)
        return
    _quiet_tensorflow()
    from ser.training import train as run_training

    try:
        out, card = run_training(cfg, address=address)
    except FileNotFoundError as exc:
        _fail(str(exc))
    val = card["validation"]["after_calibration"]
    click.echo(f"bundle: {out}")
    click.echo(f"best epoch {card['best_epoch']}, validation accuracy {val['accuracy']:.4f}, "
               f"ECE {val['ece']:.4f} at temperature {card['calibration']['temperature']:.3f}, "
               f"{card['train_seconds']:.0f} s")
    click.echo(f"next: ser evaluate --model {out} --protocol {cfg.protocol}")
