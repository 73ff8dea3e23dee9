"""The `ser` command line. Heavy imports (TensorFlow, Ray) happen inside commands so `--help` is instant."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click

from ser import __version__, bundle, ravdess

DEFAULT_DATA = "../shared/data/ravdess"
RUN_FAILED = 3  # `ser label` exit code: the run stopped part-way (1: some files failed, 2: usage error)
RAY_WAS_UP = "ser.ray_was_up"  # click context meta: Ray was initialized before the command ran (see _leave_ray)
# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) is noise for a command-line user.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Imported by Keras at import time, each guarded by `except ImportError`, for features ser never uses (the
# scikit-learn wrappers, image-gallery plots): 0.6 and 0.4 CPU-s of every TensorFlow import.
KERAS_OPTIONAL_IMPORTS = ("sklearn", "matplotlib")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its native start-up lines (written before logging is set up) silenced.

    What it printed is shown after all if the import fails. KERAS_OPTIONAL_IMPORTS are kept out of the import:
    together they are ~30% of it, paid by every inference actor before it scores anything. They import
    normally afterwards (the `seed` split, the HTML reports).
    """
    if "tensorflow" in sys.modules:
        return
    blocked = [name for name in KERAS_OPTIONAL_IMPORTS if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # makes `import name` raise ImportError, which Keras handles
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            for name in blocked:
                del sys.modules[name]


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _leave_ray() -> None:
    """Disconnect from the Ray this command joined or started (stopping an embedded one), so no worker log line
    lands after the job's last words. A Ray that was up before the command (the program that runs it in its own
    process, e.g. a test session) is left running."""
    context = click.get_current_context(silent=True)
    if _ray_is_up() and not (context and context.meta.get(RAY_WAS_UP)):
        sys.modules["ray"].shutdown()


def _fail(message: str, code: int = 2) -> None:
    _leave_ray()
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _job_config(cls, path: Path | None, overrides: tuple[str, ...], print_config: bool, **values):
    """A job's config from defaults <- YAML <- --set <- flags; printed and exit 0 for --print-config, exit 2 if bad."""
    from ser import config as config_io

    try:
        cfg = config_io.load(cls, path, overrides, **values)
    except (config_io.ConfigError, ValueError) as exc:
        _fail(str(exc))
    if print_config:
        click.echo(config_io.dump(cfg), nl=False)
        sys.exit(0)
    return cfg


def _load_predictor(model: Path):
    """A Predictor for `model`, or a one-line error and exit 2."""
    import_tensorflow_quietly()
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
    show_default="$SER_MODEL or models/ravdess-actors",
    help="Model bundle folder (model.keras, train_mean.npy, train_std.npy, model.json).",
)


low_confidence_option = click.option(
    "--low-confidence",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Confidence below which a labeled file counts as low-confidence (needing review).",
)


def job_options(command):
    """The options every Ray job command shares: config overrides, cluster address, --print-config."""
    options = [
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override any config key (dotted for nested keys), e.g. --set inference.batch_size=128.",
        ),
        click.option(
            "--address",
            default=None,
            envvar="RAY_ADDRESS",
            help="Ray cluster address [default: $RAY_ADDRESS, else start a local Ray].",
        ),
        click.option("--print-config", is_flag=True, help="Print the effective config and exit."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="ser")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Speech emotion recognition for whole audio collections.

    \b
    Label a collection:   ser label RECORDINGS --output OUT      (Ray; local or a cluster)
    Label a few files:    ser predict a.wav b.flac
    Train a model:        ser train --config configs/train.yaml   (Ray Train)
    Score a model:        ser evaluate --model models/ravdess-seed --protocol seed
    Report on the labels: ser report OUT --html report.html
    Try it in a browser:  ser app                                (Streamlit web demo)

    Emotions: neutral, calm, happy, sad, angry, fearful, disgust, surprised. The shipped models are trained
    on RAVDESS (CC BY-NC-SA 4.0, https://zenodo.org/records/1188976): non-commercial use only.
    """
    ctx.meta[RAY_WAS_UP] = _ray_is_up()


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
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_DATA,
    show_default=True,
    help=f"RAVDESS folder (get it from {ravdess.ZENODO_URL}).",
)
@click.option(
    "--protocol",
    type=click.Choice(ravdess.PROTOCOLS),
    default=None,
    help="Split to test on [default: the protocol the model was trained with].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with all metrics.")
@click.option("--html", "html", type=click.Path(path_type=Path), default=None, help="Also write an HTML report here.")
@click.option("--record", is_flag=True, help="Store the test metrics in the bundle's model.json (model card).")
def evaluate(model: Path, data_dir: Path, protocol: str | None, as_json: bool, html: Path | None, record: bool) -> None:
    """Score a model on a RAVDESS protocol's test split.

    Reports accuracy, macro-F1, weighted F1, per-class precision/recall/F1, the confusion matrix and the
    expected calibration error (15 bins), before and after the bundle's temperature scaling. How much of that
    is the test set's size alone: 95% bootstrap intervals (test files resampled) for accuracy and macro-F1,
    and the range of ECE a perfectly calibrated model with the same confidences shows on as many files.
    The test split is only ever touched here.
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


@main.command()
@click.argument("out", type=str)
@click.option("--html", "html", type=click.Path(path_type=Path), required=True, help="Write the HTML report here.")
@click.option("--run", "run", default=None, help="Only this run id [default: the latest result of every file].")
@low_confidence_option
def report(out: str, html: Path, run: str | None, low_confidence: float) -> None:
    """Write a self-contained HTML report on a labeling output folder OUT (local path or s3://...).

    Runs over time (from the run manifests), label distribution, confidence per label, the low-confidence
    and error shares, the slowest (or longest) files and the error reasons.
    """
    from ser.report import results_html

    try:
        page = results_html(out, run, low_confidence)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    html.write_text(page)
    click.echo(f"report: {html}")


@main.command()
@model_option
@click.option("--port", type=int, default=8501, show_default=True, help="Port to serve on.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0 in Docker).")
def app(model: Path, port: int, address: str) -> None:
    """Start the web demo (Streamlit): upload or record a clip, see its emotion and every class probability."""
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        _fail("the web demo needs Streamlit: pip install '.[app]'")
    try:
        bundle.read_card(model)
    except bundle.BundleError as exc:
        _fail(str(exc))
    script = Path(__file__).with_name("app.py")
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
    ]
    os.execve(sys.executable, command, {**os.environ, "SER_MODEL": str(model.resolve())})


def _evaluation_table(result: dict, classes: tuple[str, ...]) -> str:
    from ser.evaluate import interval

    lines = [
        f"model {result['model']}  protocol {result['protocol']}  test files {result['n']}",
        f"accuracy {result['accuracy']:.4f} {interval(result, 'accuracy')}  "
        f"macro-F1 {result['macro_f1']:.4f} {interval(result, 'macro_f1')}  weighted-F1 {result['weighted_f1']:.4f}",
        f"ECE (15 bins) {result['ece']:.4f} at temperature {result['temperature']:.3f} "
        f"(uncalibrated {result['ece_uncalibrated']:.4f}); a calibrated model: {interval(result, 'ece_if_calibrated')}",
        f"[low, high]: {result['intervals']['level']:.0%} of what {result['n']} test files give by chance "
        f"({result['intervals']['resamples']} resamples; `ser evaluate --help`)",
        "",
        f"{'class':<10} {'precision':>9} {'recall':>7} {'f1':>7} {'n':>5}",
    ]
    for name, row in result["per_class"].items():
        lines.append(f"{name:<10} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>7.3f} {row['support']:>5}")
    lines += [
        "",
        "confusion matrix (rows: true, columns: predicted)",
        " " * 10 + "".join(f"{c[:6]:>7}" for c in classes),
    ]
    for name, row in zip(classes, result["confusion_matrix"], strict=True):
        lines.append(f"{name:<10}" + "".join(f"{v:>7}" for v in row))
    return "\n".join(lines)


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="YAML config (see configs/train.yaml for every key and its default).",
)
@click.option("--protocol", type=click.Choice(ravdess.PROTOCOLS), default=None, help="Split protocol.")
@click.option("--data", "data_dir", default=None, help="RAVDESS folder.")
@click.option("--output", default=None, help="Bundle folder to write ({protocol} and {run_id} are filled in).")
@click.option("--num-workers", type=int, default=None, help="Ray Train workers.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs (early stopping may end sooner).")
@click.option("--seed", type=int, default=None, help="Random seed.")
@click.option("--resume", "resume_folder", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Go on with an interrupted run, under its own configuration: the run folder it printed when it "
                   "started (<storage_path>/<run id>). Takes no other option but --address.")
@job_options
@click.pass_context
def train(ctx, config_path, protocol, data_dir, output, num_workers, epochs, seed, resume_folder, overrides, address,
          print_config) -> None:
    """Train a model with Ray Train over the shared feature stage and write a bundle.

    Features are extracted once with Ray Data and cached; each worker runs the original recipe with a
    custom distributed step; the best epoch on validation is kept (`--set keep=last`: the final one) and
    its temperature is fitted on validation. `--set max_minutes=N` ends each member after the first epoch
    past N minutes, keeping its best epoch so far. Evaluate the result with `ser evaluate --model OUTPUT`.
    `--set distill_from=BUNDLE` trains on a teacher's soft targets too (e.g. one model distilled from an
    ensemble of the same protocol).

    Every epoch leaves a checkpoint of the whole training state in the run folder printed at the start;
    after an interruption (Ctrl-C, a lost machine) `ser train --resume FOLDER` goes on after the last epoch
    whose checkpoint was recorded (the one in flight, and at most the one before, are run again), and ends
    where the uninterrupted run would: same data order, augmentation, dropout and learning-rate schedule.
    """
    given = [param.opts[0] for param in ctx.command.params if param.name not in ("resume_folder", "address")
             and ctx.get_parameter_source(param.name) is not click.core.ParameterSource.DEFAULT]
    if resume_folder is not None and given:
        _fail(f"--resume goes on under the run's own configuration; drop {', '.join(given)}")
    import_tensorflow_quietly()
    from ser import training

    if resume_folder is not None:
        _run_training(lambda: training.resume(resume_folder, address=address))
        return

    cfg = _job_config(
        training.TrainConfig,
        config_path,
        overrides,
        print_config,
        protocol=protocol,
        data_dir=data_dir,
        output=output,
        num_workers=num_workers,
        epochs=epochs,
        seed=seed,
    )
    _run_training(lambda: training.train(cfg, address=address))


def _run_training(run) -> None:
    """Run `ser train`'s job and say what it wrote; bad input, and an interruption, end in a one-line message."""
    from ser import training

    try:
        out, card = run()
    except (FileNotFoundError, training.ResumeError) as exc:
        _fail(str(exc))
    except training.Interrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(130)
    _leave_ray()
    extra = f"{card['train_seconds']:.0f} s"
    if card.get("resumed_after"):
        epochs = ", ".join(str(resume["epoch"]) for resume in card["resumed_after"])
        extra += f" (resumed after epoch {epochs}; {card['epoch_loop_seconds']:.0f} s of epochs in all)"
    _echo_trained(out, card, extra)


def _echo_trained(out: Path, card: dict, extra: str) -> None:
    val = card["validation"]["after_calibration"]
    members = bundle.ensemble_members(card)
    chosen = (f"ensemble of {len(members)}" if members else
              f"kept epoch {card['best_epoch']} of {len(card['history'])} (stopped by {card['stopped_by']})")
    click.echo(f"bundle: {out}")
    click.echo(
        f"{chosen}, validation accuracy {val['accuracy']:.4f}, "
        f"ECE {val['ece']:.4f} at temperature {card['calibration']['temperature']:.3f}, {extra}"
    )
    click.echo(f"next: ser evaluate --model {out} --protocol {card['protocol']}")


@main.command()
@click.argument("members", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--cache-dir", default=None, help="Feature cache [default: the members' training cache_dir].")
def ensemble(members: tuple[Path, ...], output: Path, cache_dir: str | None) -> None:
    """Combine bundles trained separately (same protocol, split and statistics; other seeds) into one bundle.

    The bundle's model averages the members' logits; its temperature is fitted again on the validation
    split. A member that is itself an ensemble adds each of its models, so every base model weighs the
    same; training options in which a member differs are recorded in its entry of model.json.
    `ser train --set ensemble=N` trains N members and combines them in one go.
    """
    import_tensorflow_quietly()
    from ser.training import ensemble_bundles

    try:
        out, card = ensemble_bundles(list(members), output, cache_dir)
    except (bundle.BundleError, FileNotFoundError) as exc:
        _fail(str(exc))
    _echo_trained(out, card, f"{len(card['ensemble']['members'])} members")


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cross-fit", "folds", multiple=True, required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A bundle of MODEL's recipe trained with other validation_actors (repeat, one per fold).")
@click.option("--output", "-o", default=None, type=click.Path(path_type=Path),
              help="Write the recalibrated copy here [default: update MODEL's model.json in place].")
@click.option("--cache-dir", default=None, help="Feature cache [default: the bundles' training cache_dir].")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration entry of model.json as JSON.")
def calibrate(model: Path, folds: tuple[Path, ...], output: Path | None, cache_dir: str | None,
              as_json: bool) -> None:
    """Refit MODEL's temperature over more held-out voices than its validation actors (actors protocol).

    Each --cross-fit bundle is one model of MODEL's recipe trained with `validation_actors` set to another
    fold of actors 1-20 (e.g. `ser train --set "validation_actors=[1,2,3,4]"`), so every fold's files are
    scored by a model that never heard those voices. One temperature is fitted for single models over all
    folds (T_all) and over MODEL's validation actors alone (T_val); MODEL's validation temperature is
    multiplied by T_all / T_val. model.json records every figure, and a check with each fold held out in
    turn: NLL and ECE at one other fold's temperature against the temperature pooled over all other folds.
    The weights do not change; predict, label and evaluate apply the new temperature.
    """
    import_tensorflow_quietly()
    from ser.training import calibrate_bundle

    if output is not None and output.exists():
        _fail(f"{output}: already exists; choose a new folder or leave --output out to update {model} in place")
    try:
        out, card = calibrate_bundle(model, list(folds), output, cache_dir)
    except (bundle.BundleError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    entry = card["calibration"]
    if as_json:
        click.echo(json.dumps(entry, indent=2))
        return
    fit, check = entry["cross_fit"], entry["cross_fit"]["held_out_check"]
    click.echo(f"bundle: {out}")
    for fold in fit["folds"]:
        click.echo(f"  actors {fold['validation_actors']}: {fold['files']} files, accuracy {fold['accuracy']:.3f}, "
                   f"single-model temperature {fold['single_model_temperature']:.3f}  ({fold['bundle']})")
    click.echo(f"single-model temperature: {fit['single_model_temperature_all_folds']:.3f} over all folds, "
               f"{fit['single_model_temperature_validation_fold']:.3f} over the validation actors")
    click.echo(f"temperature: {entry['validation_temperature']:.3f} x {fit['factor']:.3f} = {entry['temperature']:.3f}")
    for name, label in (("one_fold_temperature", "one other fold's T"), ("other_folds_temperature", "pooled T")):
        click.echo(f"held out in turn at {label}: NLL {check[name]['nll']:.4f}, ECE {check[name]['ece']:.4f}")
    click.echo(f"next: ser evaluate --model {out} --protocol actors")


@main.command()
@click.argument("input_spec", metavar="INPUT", required=False)
@click.option("--output", "-o", default=None, help="Output folder or s3://bucket/prefix (Hive-partitioned Parquet).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="YAML config (see configs/label.yaml for every key and its default).",
)
@click.option(
    "--root",
    default=None,
    help="Every input must lie inside this folder or s3:// prefix (symlinks resolved); relative paths in a list "
    "file are taken from here. Inputs outside it refuse the run, naming them (exit 2).",
)
@click.option("--model", default=None, help="Model bundle folder [default: models/ravdess-actors].")
@click.option("--force", is_flag=True, help="Relabel files already labeled with this model.")
@click.option("--segments", is_flag=True, help="Also write one row per 3 s window to OUT/_segments.")
@job_options
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def label(input_spec, output, config_path, root, model, force, segments, overrides, address, no_progress,
          print_config):
    """Label every audio file of INPUT with its emotion, into a Parquet dataset at --output.

    INPUT is a folder or s3://bucket/prefix (recursive), a glob ('rec/**/*.wav'), a .txt file listing paths,
    or one file. Files already labeled by this model with the same path, size and mtime are skipped, so a
    nightly run labels new and changed files only. Unreadable files become rows with status=error. Exit
    code: 0 all labeled, 1 some files failed, 2 usage or config error, 3 the run failed part-way (storage or
    cluster; run again to finish). Layout and schema: docs/LABELING.md; failures: docs/RELIABILITY.md.
    """
    from ser.pipeline import InputError, LabelConfig, RunFailed, run, summary

    cfg = _job_config(
        LabelConfig,
        config_path,
        overrides,
        print_config,
        input=input_spec,
        output=output,
        root=root,
        model=model,
        force=force or None,
        segments=segments or None,
        progress=False if no_progress else None,
    )
    try:
        manifest = run(cfg, address=address)
    except (InputError, bundle.BundleError, OSError) as exc:
        _fail(str(exc))
    except RunFailed as exc:
        _fail(str(exc), code=RUN_FAILED)
    _leave_ray()
    click.echo(summary(manifest, cfg.output))
    for item in manifest["errors"][:10]:
        click.echo(f"error: {item['path']}: {item['error']}", err=True)
    sys.exit(1 if manifest["counts"]["error"] else 0)


@main.command()
@click.argument("out")
@low_confidence_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def results(out: str, low_confidence: float, as_json: bool) -> None:
    """Summarize a labeling output OUT (folder or s3://...): runs, files per label, low-confidence share, errors.

    Counts use the latest row of each file (a relabeled file has one row per run that labeled it).
    """
    from ser import store

    try:
        summary = store.results(store.Store(out, store.s3_options()), low_confidence)
    except OSError as exc:
        _fail(str(exc))
    if not summary["rows"] and not summary["runs"]:
        _fail(f"{out}: no labeling results here")
    click.echo(json.dumps(summary) if as_json else store.results_text(summary))
