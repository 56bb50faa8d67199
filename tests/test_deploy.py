"""deploy/: the Dockerfile and the dask-kubernetes operator manifests, validated offline.

The manifests are validated against the operator's own CustomResourceDefinitions, not a schema of ours.
The `dask-kubernetes` wheel (in the `test` extra) ships the Helm chart's fully resolved CRDs, with the
Kubernetes 1.21.1 PodSpec/ServiceSpec inlined by k8s-crd-resolver, under
dask_kubernetes/operator/deployment/helm/dask-kubernetes-operator/crds/{daskcluster,daskjob}.yaml
(dask/dask-kubernetes; unchanged since commits 68d6c96 (DaskCluster) and 91e7031 (DaskJob) in 2023,
and byte-identical in releases 2024.1.0 through 2026.3.0).  The test finds those files with
importlib.util.find_spec, so it does not import dask_kubernetes (which writes a dask config file).
It takes `spec.versions[].schema.openAPIV3Schema` and validates with jsonschema the way
`kubectl apply` does (its default is --validate=strict): an unknown field is an error, not pruned silently.

Without dask-kubernetes the CRD tests skip and say why.  `_FALLBACK` is a small, closed structural schema
for the fields these manifests use.  It was written from those CRD files (2026.3.0 wheel / upstream
commit 1daa175) and is still checked for every manifest.  `test_fallback_agrees_with_the_operator_crd`
checks it against the real CRD whenever the package is installed.
"""
from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import re
import runpy
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from functools import cache
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

from diffim_dag.cli import build_parser  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REPO = DEPLOY.parent
MANIFESTS = {"DaskCluster": DEPLOY / "k8s" / "daskcluster.yaml", "DaskJob": DEPLOY / "k8s" / "daskjob.yaml"}
CRD_DIR = "operator/deployment/helm/dask-kubernetes-operator/crds"  # inside the dask_kubernetes package
QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti)?$")


# --------------------------------------------------------------------------------------------------------------
# the operator's CRDs, from the installed dask-kubernetes package


def _dask_kubernetes_dir() -> Path | None:
    spec = importlib.util.find_spec("dask_kubernetes")  # locates the package without executing it
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def _operator_crd(kind: str) -> dict:
    root = _dask_kubernetes_dir()
    if root is None:
        pytest.skip("dask-kubernetes is not installed (pip install '.[test]'): the operator's DaskCluster/DaskJob "
                    "CRDs ship in its wheel; the fallback structural schema still ran")
    path = root / CRD_DIR / f"{kind.lower()}.yaml"
    if not path.is_file():
        pytest.skip(f"this dask-kubernetes ({root}) does not ship the resolved CRD {CRD_DIR}/{path.name} "
                    "(needs >= 2024.5)")
    crd = yaml.safe_load(path.read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    return crd


def _k8s_to_jsonschema(node):
    """A CRD structural schema (OpenAPI v3 with Kubernetes extensions) -> JSON Schema with kubectl's strict
    field validation: objects that list `properties` reject unknown fields (unless
    x-kubernetes-preserve-unknown-fields), `nullable` admits null, x-kubernetes-int-or-string admits both.
    `format` (int32, int-or-string, ...) is left as annotation: the resolved CRD types IntOrString fields as
    `type: string`, which is what the API server enforces (dask/dask-kubernetes#778: integer probe ports
    are rejected), so the manifests use named ports."""
    if isinstance(node, list):
        return [_k8s_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _k8s_to_jsonschema(v) for k, v in node.items() if k != "description"}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _wrap(kind: str, body: dict, api_versions: list[str]) -> dict:
    """apiVersion/kind/metadata are implicit in a CRD's schema; add them so the whole document is checked."""
    meta = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
    schema = copy.deepcopy(body)
    schema.setdefault("required", [])
    schema["required"] = sorted({*schema["required"], "apiVersion", "kind", "metadata", "spec"})
    schema["properties"] = {"apiVersion": {"enum": api_versions}, "kind": {"const": kind}, "metadata": meta,
                            **schema["properties"]}
    schema["additionalProperties"] = False
    return schema


@cache
def _crd_schema(kind: str) -> dict:
    crd = _operator_crd(kind)
    group = crd["spec"]["group"]
    served = [v for v in crd["spec"]["versions"] if v.get("served")]
    (storage,) = [v for v in served if v.get("storage")]
    body = _k8s_to_jsonschema(storage["schema"]["openAPIV3Schema"])
    return _wrap(kind, body, [f"{group}/{v['name']}" for v in served])


# --------------------------------------------------------------------------------------------------------------
# fallback: a closed subset of the same CRDs (only the fields these manifests use), written from the files
# above (dask-kubernetes 2026.3.0 / dask/dask-kubernetes@1daa175) and checked against them when installed


def _obj(props: dict | None = None, required=(), values: dict | None = None) -> dict:
    s = {"type": "object"}
    if props is not None:
        s["properties"] = props
        s["additionalProperties"] = False
    if values is not None:
        s["additionalProperties"] = values
    if required:
        s["required"] = list(required)
    return s


def _arr(items: dict) -> dict:
    return {"type": "array", "items": items}


_S, _I, _B = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_STRMAP = _obj(values=_S)
_META = _obj({"labels": _STRMAP, "annotations": _STRMAP})
_PROBE = _obj({"httpGet": _obj({"port": _S, "path": _S, "scheme": _S}, required=["port"]),
               "initialDelaySeconds": _I, "periodSeconds": _I})
_CONTAINER = _obj({
    "name": _S, "image": _S, "imagePullPolicy": _S, "command": _arr(_S), "args": _arr(_S),
    "env": _arr(_obj({"name": _S, "value": _S}, required=["name"])),
    "resources": _obj({"requests": _STRMAP, "limits": _STRMAP}),
    "ports": _arr(_obj({"name": _S, "containerPort": _I, "protocol": _S}, required=["containerPort"])),
    "volumeMounts": _arr(_obj({"name": _S, "mountPath": _S, "readOnly": _B}, required=["mountPath", "name"])),
    "readinessProbe": _PROBE, "livenessProbe": _PROBE,
    "securityContext": _obj({"allowPrivilegeEscalation": _B, "readOnlyRootFilesystem": _B,
                             "capabilities": _obj({"drop": _arr(_S)})}),
}, required=["name"])
_POD = _obj({
    "containers": _arr(_CONTAINER), "restartPolicy": _S,
    "securityContext": _obj({"runAsNonRoot": _B, "runAsUser": _I, "runAsGroup": _I, "fsGroup": _I,
                             "seccompProfile": _obj({"type": _S}, required=["type"])}),
    "volumes": _arr(_obj({"name": _S,
                          "persistentVolumeClaim": _obj({"claimName": _S, "readOnly": _B}, required=["claimName"]),
                          "secret": _obj({"secretName": _S, "defaultMode": _I}),
                          "emptyDir": _obj({"medium": _S, "sizeLimit": _S})}, required=["name"])),
}, required=["containers"])
_SERVICE = _obj({"type": _S, "selector": _STRMAP,
                 "ports": _arr(_obj({"name": _S, "protocol": _S, "port": _I, "targetPort": _S}, required=["port"]))})
_CLUSTER_SPEC = _obj({
    "idleTimeout": _I,
    "scheduler": _obj({"metadata": _META, "spec": _POD, "service": _SERVICE}, required=["spec", "service"]),
    "worker": _obj({"replicas": _I, "metadata": _META, "spec": _POD}, required=["spec"]),
}, required=["scheduler", "worker"])
_FALLBACK_BODY = {
    "DaskCluster": _obj({"spec": _CLUSTER_SPEC}, required=["spec"]),
    "DaskJob": _obj({"spec": _obj({"cluster": _obj({"spec": _CLUSTER_SPEC}, required=["spec"]),
                                   "job": _obj({"metadata": _META, "spec": _POD})}, required=["cluster", "job"])}),
}
_FALLBACK = {k: _wrap(k, v, ["kubernetes.dask.org/v1"]) for k, v in _FALLBACK_BODY.items()}

SOURCES = ["operator-crd", "fallback"]


def _validator(kind: str, source: str):
    schema = _crd_schema(kind) if source == "operator-crd" else _FALLBACK[kind]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _documents(kind) -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFESTS[kind].read_text()) if d]


def _load(kind):
    """The Dask resource of a manifest file (each file also holds the cluster's NetworkPolicy)."""
    (doc,) = [d for d in _documents(kind) if d["kind"] == kind]
    return doc


def _network_policy(kind):
    (doc,) = [d for d in _documents(kind) if d["kind"] == "NetworkPolicy"]
    return doc


def _cluster_spec(doc):
    return doc["spec"] if doc["kind"] == "DaskCluster" else doc["spec"]["cluster"]["spec"]


def _pods(doc):
    pods = {"worker": _cluster_spec(doc)["worker"]["spec"], "scheduler": _cluster_spec(doc)["scheduler"]["spec"]}
    if doc["kind"] == "DaskJob":
        pods["job"] = doc["spec"]["job"]["spec"]
    return pods


def _bytes(q: str) -> float:
    m = QUANTITY.match(str(q))
    assert m, f"not a Kubernetes quantity: {q!r}"
    num, unit = m.groups()
    return float(num) * {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]


# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_validates_against_the_operator_crd_schema(kind, source):
    doc = _load(kind)
    errors = sorted(_validator(kind, source).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert doc["apiVersion"] == "kubernetes.dask.org/v1" and doc["kind"] == kind


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_names_are_valid_operator_cluster_names(kind):
    """The operator names the cluster after the DaskCluster/DaskJob and its service `<name>-scheduler`, and
    refuses names that would not fit (dask_kubernetes/constants.py: VALID_CLUSTER_NAME)."""
    doc = _load(kind)
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63 - len("-scheduler")
    # the scheduler service selects the pods of *this* cluster (for a DaskJob the cluster is named after the job)
    assert _cluster_spec(doc)["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == name
    root = _dask_kubernetes_dir()
    if root is not None and (root / "constants.py").is_file():
        constants = runpy.run_path(str(root / "constants.py"))  # the module alone, not the package's __init__
        assert constants["VALID_CLUSTER_NAME"].match(name)


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_container_has_requests_limits_non_root_and_the_volume(kind):
    doc = _load(kind)
    for role, pod in _pods(doc).items():
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, role
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", role
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, role
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], role
            res = c["resources"]
            for key in ("cpu", "memory"):
                assert _bytes(res["requests"][key]) <= _bytes(res["limits"][key]), (role, key)
            # no secret in the manifest: a key is only ever a path to the Secret mounted read-only
            secretish = {n: v for n, v in _env(c).items() if re.search("SECRET|PASSWORD|TOKEN|KEY", n)}
            assert all(v.startswith(TLS_DIR + "/") and v.endswith(".key") for v in secretish.values()), role
        if role in ("worker", "job"):
            mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            assert "/data" in mounts, role
            assert any(v["name"] == "data" and v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"])
    if kind == "DaskJob":
        assert doc["spec"]["job"]["spec"]["restartPolicy"] == "Never"  # the operator's default is OnFailure


def _mutations():
    def job(f):
        doc = _load("DaskJob")
        f(doc)
        return "DaskJob", doc

    def cluster(f):
        doc = _load("DaskCluster")
        f(doc)
        return "DaskCluster", doc

    sched = lambda d: d["spec"]["cluster"]["spec"]["scheduler"]  # noqa: E731
    return {
        "apiVersion v2": job(lambda d: d.update(apiVersion="kubernetes.dask.org/v2")),
        "kind": job(lambda d: d.update(kind="DaskCluster")),
        "replicas as text": job(lambda d: d["spec"]["cluster"]["spec"]["worker"].update(replicas="four")),
        "no scheduler service": job(lambda d: sched(d).pop("service")),
        "no job containers": job(lambda d: d["spec"]["job"]["spec"].pop("containers")),
        "unknown field (workers)": cluster(lambda d: d["spec"].update(workers=d["spec"].pop("worker"))),
        "unknown container field": job(lambda d: d["spec"]["job"]["spec"]["containers"][0].update(cmd=["x"])),
        # YAML `cpu: 1` is an int; the CRD types resource quantities as strings
        "unquoted cpu": job(lambda d: d["spec"]["job"]["spec"]["containers"][0]["resources"]["limits"]
                            .update(cpu=1)),
        # the resolved CRD types IntOrString as string (dask/dask-kubernetes#778): ports must be named
        "integer targetPort": job(lambda d: sched(d)["service"]["ports"][0].update(targetPort=8786)),
        "integer probe port": job(lambda d: sched(d)["spec"]["containers"][0]["readinessProbe"]["httpGet"]
                                  .update(port=8787)),
        "runAsUser as text": job(lambda d: d["spec"]["job"]["spec"]["securityContext"].update(runAsUser="x")),
        "volume without claimName": job(lambda d: d["spec"]["job"]["spec"]["volumes"][0]["persistentVolumeClaim"]
                                        .pop("claimName")),
    }


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", sorted(_mutations()))
def test_schemas_reject_broken_manifests(case, source):
    kind, doc = _mutations()[case]
    assert list(_validator(kind, source).iter_errors(doc)), case


def _agree(fallback: dict, real: dict, path: str = ""):
    """Every node of the fallback exists in the real CRD with the same type and the same required fields."""
    assert fallback.get("type") == real.get("type"), path
    assert sorted(fallback.get("required", [])) == sorted(real.get("required", [])), path
    for name, sub in fallback.get("properties", {}).items():
        assert name in real.get("properties", {}), f"{path}.{name} is not in the operator's CRD"
        _agree(sub, real["properties"][name], f"{path}.{name}")
    if "items" in fallback:
        _agree(fallback["items"], real["items"], f"{path}[]")
    if isinstance(fallback.get("additionalProperties"), dict):
        _agree(fallback["additionalProperties"], real["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_fallback_agrees_with_the_operator_crd(kind):
    _agree(_FALLBACK[kind], _crd_schema(kind), kind)


# --------------------------------------------------------------------------------------------------------------


def _dockerfile():
    text = DEPLOY.joinpath("Dockerfile").read_text()
    lines = text.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


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
    # the manifests run the image as the Dockerfile's user
    uid = int(users[-1].split(":")[0])
    for kind in MANIFESTS:
        assert {p["securityContext"]["runAsUser"] for p in _pods(_load(kind)).values()} == {uid}


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


# --------------------------------------------------------------------------------------------------------------
# hardening: TLS between scheduler, workers and clients; a NetworkPolicy; read-only root filesystems.
# The NetworkPolicy, the Secret the setup step prints and every pod spec are validated against the
# Kubernetes API's own JSON schemas (kubernetes-validate, strict: unknown fields are errors).

TLS_DIR = "/etc/dask-tls"
TLS_SECRET = "diffim-dag-tls"
K8S_VERSION = "1.30.0"  # a Kubernetes release still in wide use; the fields used here are all older


def _k8s_validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed "
                             "(pip install '.[test]'): it ships the Kubernetes API's JSON schemas")
    kv.validate(doc, K8S_VERSION, strict=True)


def _containers(doc):
    return [(role, c) for role, pod in _pods(doc).items() for c in pod["containers"]]


def _env(container) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_pod_spec_validates_as_a_kubernetes_pod(kind):
    """The operator copies these specs into Pods/Deployments: they must also be valid for a current API
    server, not only for the PodSpec of Kubernetes 1.21 that the CRD inlines."""
    for role, pod in _pods(_load(kind)).items():
        _k8s_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{role}"}, "spec": pod})


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_network_policy_admits_only_the_clusters_own_pods(kind):
    doc, policy = _load(kind), _network_policy(kind)
    _k8s_validate(policy)
    name = doc["metadata"]["name"]
    spec = policy["spec"]
    # it selects every pod of this cluster (the operator labels scheduler, workers and the job pod with
    # dask.org/cluster-name) and restricts their ingress
    assert spec["podSelector"] == {"matchLabels": {"dask.org/cluster-name": name}}
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert "ports" not in rule  # workers listen on ephemeral ports; the peers are what is restricted
    peers = rule["from"]
    assert all(set(p) == {"podSelector"} for p in peers), "no namespaceSelector / ipBlock: same namespace only"
    labels = [p["podSelector"]["matchLabels"] for p in peers]
    assert {"dask.org/cluster-name": name} in labels
    extra = [lab for lab in labels if lab != {"dask.org/cluster-name": name}]
    assert extra == ([] if kind == "DaskJob" else [{"diffim-dag/client": "true"}])
    # the operator's own labels are what the policy relies on
    controller = _dask_kubernetes_dir()
    if controller is not None and (controller / "operator/controller/controller.py").is_file():
        src = (controller / "operator/controller/controller.py").read_text()
        assert src.count('"dask.org/cluster-name": cluster_name') >= 3  # scheduler, worker, job-runner


def _broken_policies():
    def policy(f):
        doc = _network_policy("DaskJob")
        f(doc)
        return doc

    return {
        "unknown field": policy(lambda d: d["spec"].update(ingres=d["spec"].pop("ingress"))),
        "selector as a list": policy(lambda d: d["spec"].update(podSelector=["dask.org/cluster-name"])),
        "policyTypes as text": policy(lambda d: d["spec"].update(policyTypes="Ingress")),
    }


@pytest.mark.parametrize("case", sorted(_broken_policies()))
def test_kubernetes_schema_rejects_broken_policies(case):
    kv = pytest.importorskip("kubernetes_validate")
    with pytest.raises(kv.ValidationError):
        kv.validate(_broken_policies()[case], K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_read_only_root_with_scratch_and_tls_everywhere(kind):
    doc = _load(kind)
    name = doc["metadata"]["name"]
    for role, pod in _pods(doc).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"] == {"secretName": TLS_SECRET, "defaultMode": 0o440}, role
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"], role  # may read 0440
        assert "emptyDir" in volumes["scratch"], role
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, role
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts["/tmp"]["name"] == "scratch", role  # tempfile, Dask's local directory and spill
            assert mounts[TLS_DIR]["name"] == "tls" and mounts[TLS_DIR]["readOnly"] is True, role
            env = _env(c)
            assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "true", role
            assert env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"] == f"{TLS_DIR}/ca.crt", role
            for part in ("SCHEDULER", "WORKER", "CLIENT"):
                assert env[f"DASK_DISTRIBUTED__COMM__TLS__{part}__CERT"] == f"{TLS_DIR}/tls.crt", role
                assert env[f"DASK_DISTRIBUTED__COMM__TLS__{part}__KEY"] == f"{TLS_DIR}/tls.key", role
            # set here so that the operator does not add its tcp:// address
            assert env["DASK_SCHEDULER_ADDRESS"] == f"tls://{name}-scheduler:8786", role
            # the scheduler moves no task of a visit to another worker (diffim_dag.cluster.work_stealing)
            assert env["DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING"] == "False", role
            if role in ("scheduler", "worker"):
                args = c["args"]
                assert args[args.index("--protocol") + 1] == "tls", role
    scheduler = _cluster_spec(doc)["scheduler"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        if probe in scheduler:
            assert scheduler[probe]["httpGet"]["scheme"] == "HTTPS"  # the dashboard serves TLS too


# --------------------------------------------------------------------------------------------------------------
# the documented setup step, run for real: its Secret is valid, and a scheduler, a worker and a client
# started with the manifests' own arguments and environment talk TLS and turn away everyone else


def _tls_secret(tmp_path: Path, tag: str) -> Path:
    if shutil.which("openssl") is None or shutil.which("bash") is None:
        pytest.skip("deploy/tls-secret.sh needs bash and openssl")
    out = subprocess.run(["bash", str(DEPLOY / "tls-secret.sh"), "--namespace", "survey"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    secret = yaml.safe_load(out.stdout)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == TLS_SECRET
    _k8s_validate(secret)
    folder = tmp_path / tag
    folder.mkdir()
    for key, value in secret["data"].items():
        (folder / key).write_bytes(base64.b64decode(value))
    assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pod_env(container, tls: Path, scheduler: str) -> dict[str, str]:
    env = {k: v.replace(TLS_DIR, str(tls)) for k, v in _env(container).items()}
    env["DASK_SCHEDULER_ADDRESS"] = scheduler
    keep = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    return {**keep, **env}


def _dask_cli(container, extra: dict[str, str | None]) -> list[str]:
    """The container's `dask ...` command, with host-specific values replaced (None drops the option)."""
    args = list(container["args"])
    for opt, value in extra.items():
        if opt in args:
            i = args.index(opt)
            del args[i:i + 2]
        if value is not None:
            args += [opt, value]
    return [sys.executable, "-m", "distributed.cli.dask_" + args[0], *args[1:]]


def _wait_for(predicate, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def test_setup_step_secret_gives_a_working_mutual_tls_cluster(tmp_path):
    doc = _load("DaskJob")
    tls = _tls_secret(tmp_path, "cluster")
    stranger = _tls_secret(tmp_path, "stranger")  # a second run: a different CA
    assert (tls / "ca.crt").read_bytes() != (stranger / "ca.crt").read_bytes()
    port, dash = _free_port(), _free_port()
    address = f"tls://127.0.0.1:{port}"
    (sched_c,) = _cluster_spec(doc)["scheduler"]["spec"]["containers"]
    (worker_c,) = _cluster_spec(doc)["worker"]["spec"]["containers"]
    (job_c,) = doc["spec"]["job"]["spec"]["containers"]
    procs = []
    try:
        procs.append(subprocess.Popen(
            _dask_cli(sched_c, {"--port": str(port), "--dashboard-address": f"127.0.0.1:{dash}",
                                "--host": "127.0.0.1"}),
            env=_pod_env(sched_c, tls, address), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        procs.append(subprocess.Popen(
            _dask_cli(worker_c, {"--name": "w0", "--dashboard-address": None, "--memory-limit": "1GiB",
                                 "--host": "127.0.0.1"}) + ["--no-dashboard"],
            env=_pod_env(worker_c, tls, address), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

        # the dashboard answers the probes over HTTPS with the cluster's certificate
        context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
        context.check_hostname = False

        def healthy():
            try:
                return urllib.request.urlopen(f"https://127.0.0.1:{dash}/health", context=context,
                                              timeout=2).read() == b"ok"
            except OSError:
                return False

        _wait_for(healthy, 60, "the scheduler's HTTPS /health")

        # the job pod's client: the CLI's own scheduler lookup and client, with the job container's env
        client_code = (
            "import sys\n"
            "from diffim_dag.cluster import make_client, scheduler_for\n"
            "from diffim_dag.config import PipelineConfig\n"
            "address = scheduler_for(None, PipelineConfig().cluster)\n"
            "client, _ = make_client(address)\n"
            "client.wait_for_workers(1, timeout=60)\n"
            "workers = list(client.scheduler_info()['workers'])\n"
            "print(address, client.submit(sum, [1, 2, 3]).result(), *workers)\n"
        )
        ok = subprocess.run([sys.executable, "-c", client_code], env=_pod_env(job_c, tls, address),
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr[-2000:]
        got_address, total, *workers = ok.stdout.split()
        assert got_address == address and total == "6"
        assert workers and all(w.startswith("tls://") for w in workers)  # the worker listens on TLS too

        # turned away: a client with a certificate from another CA, and a plain-TCP client without one
        probe = (
            "import sys\n"
            "from distributed import Client\n"
            "try:\n"
            "    Client(sys.argv[1], timeout=5)\n"
            "except Exception as e:\n"
            "    print('refused', type(e).__name__)\n"
            "else:\n"
            "    print('connected')\n"
        )
        env_stranger = _pod_env(job_c, stranger, address)
        env_plain = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
        for env, target in ((env_stranger, address), (env_plain, f"tcp://127.0.0.1:{port}")):
            out = subprocess.run([sys.executable, "-c", probe, target], env=env, capture_output=True, text=True,
                                 timeout=60, cwd=tmp_path)
            assert out.stdout.startswith("refused"), (target, out.stdout, out.stderr[-1000:])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
