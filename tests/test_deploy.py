"""deploy/: the Dockerfile and the dask-kubernetes operator manifests, validated offline.

The DaskCluster/DaskJob JSON schemas in deploy/schemas/ are minimal ones written from the operator's
documented CRDs (kubernetes.dask.org/v1): `kubectl --dry-run=client` needs an API server.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

from diffim_dag.cli import build_parser  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REPO = DEPLOY.parent
MANIFESTS = {"DaskCluster": DEPLOY / "k8s" / "daskcluster.yaml", "DaskJob": DEPLOY / "k8s" / "daskjob.yaml"}
SCHEMAS = {"DaskCluster": DEPLOY / "schemas" / "daskcluster.schema.json",
           "DaskJob": DEPLOY / "schemas" / "daskjob.schema.json"}
QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti)?$")


def _validator(kind):
    schema = json.loads(SCHEMAS[kind].read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _load(kind):
    return yaml.safe_load(MANIFESTS[kind].read_text())


def _cluster_spec(doc):
    return doc["spec"] if doc["kind"] == "DaskCluster" else doc["spec"]["cluster"]["spec"]


def _pods(doc):
    pods = {"worker": _cluster_spec(doc)["worker"]["spec"], "scheduler": _cluster_spec(doc)["scheduler"]["spec"]}
    if doc["kind"] == "DaskJob":
        pods["job"] = doc["spec"]["job"]["spec"]
    return pods


def _bytes(q: str) -> float:
    num, unit = QUANTITY.match(str(q)).groups()
    return float(num) * {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_validates_against_the_operator_crd_schema(kind):
    doc = _load(kind)
    errors = sorted(_validator(kind).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert doc["apiVersion"] == "kubernetes.dask.org/v1" and doc["kind"] == kind


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_container_has_requests_limits_non_root_and_the_volume(kind):
    doc = _load(kind)
    for role, pod in _pods(doc).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, role
        assert pod["securityContext"]["runAsUser"] != 0, role
        for c in pod["containers"]:
            res = c["resources"]
            for key in ("cpu", "memory"):
                assert _bytes(res["requests"][key]) <= _bytes(res["limits"][key]), (role, key)
            env = {e["name"] for e in c.get("env", [])}
            assert not {n for n in env if re.search("SECRET|PASSWORD|TOKEN|KEY", n)}, role
        if role in ("worker", "job"):
            mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            assert "/data" in mounts, role
            assert any(v["name"] == "data" for v in pod["volumes"])


def test_schemas_reject_broken_manifests():
    doc = _load("DaskJob")
    v = _validator("DaskJob")
    bad = copy.deepcopy(doc)
    bad["apiVersion"] = "kubernetes.dask.org/v2"
    assert list(v.iter_errors(bad))
    bad = copy.deepcopy(doc)
    bad["spec"]["cluster"]["spec"]["worker"]["replicas"] = "four"
    assert list(v.iter_errors(bad))
    bad = copy.deepcopy(doc)
    bad["spec"]["job"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "lots"
    assert list(v.iter_errors(bad))
    bad = copy.deepcopy(doc)
    del bad["spec"]["cluster"]["spec"]["scheduler"]["service"]
    assert list(v.iter_errors(bad))
    bad = copy.deepcopy(_load("DaskCluster"))
    bad["spec"]["workers"] = bad["spec"].pop("worker")
    assert list(_validator("DaskCluster").iter_errors(bad))


def _dockerfile():
    text = DEPLOY.joinpath("Dockerfile").read_text()
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_non_root_no_secrets_cli_entrypoint():
    lines = _dockerfile()
    final = lines[max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")):]
    users = [ln.split(None, 1)[1] for ln in final if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for ln in lines:
        assert not re.search(r"(SECRET|PASSWORD|TOKEN|API_KEY|AWS_)", ln.upper()), ln
        assert not ln.upper().startswith("ARG ") or "=" not in ln
    entry = [json.loads(ln.split(None, 1)[1]) for ln in final if ln.upper().startswith("ENTRYPOINT ")]
    assert entry == [["diffim-dag"]]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["diffim-dag"] == "diffim_dag.cli:main"  # the CLI the tests run through cli.main


def test_job_runs_the_cli_the_tests_run():
    doc = _load("DaskJob")
    (job,) = doc["spec"]["job"]["spec"]["containers"]
    assert "command" not in job  # the image's entrypoint (diffim-dag) is used
    args = build_parser().parse_args(job["args"])
    assert args.command == "run"
    assert Path(args.manifest).is_relative_to("/data") and Path(args.out).is_relative_to("/data")
    # the pipeline file the job names is shipped in the image (COPY pipelines /opt/diffim_dag/pipelines)
    assert Path(args.pipeline).name in {p.name for p in (REPO / "pipelines").glob("*.yaml")}
    assert any("COPY pipelines /opt/diffim_dag/pipelines" in ln for ln in _dockerfile())
    for pod in (_cluster_spec(doc)["worker"]["spec"], _cluster_spec(doc)["scheduler"]["spec"]):
        for c in pod["containers"]:
            assert c["command"] == ["dask"] and c["args"][0] in ("worker", "scheduler")
            assert c["image"] == job["image"]
    assert shlex.join(job["args"]).startswith("run ")
