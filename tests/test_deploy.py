"""deploy/: the Kubernetes manifests against the dask-kubernetes operator's CRDs, and the rest.

No Kubernetes runs here. The operator's CRD schemas (shipped in the ``dask-kubernetes`` package)
are made strict about unknown fields, as a structural schema is on the API server, and every
custom resource in deploy/kubernetes must validate. The validator is checked both ways: it rejects
misspelled fields and accepts what the operator's own ``make_cluster_spec`` emits.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib.resources import files
from pathlib import Path

import dask
import dask.config
import jsonschema
import pytest
import yaml
from dask.utils import parse_bytes

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
GROUP = "kubernetes.dask.org"
# the CRDs are 18,000 lines of YAML: libyaml reads them in a fraction of pure Python's time
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# ---- the operator's CRDs, made strict ----------------------------------------------------------


@cache
def _crds() -> dict[str, dict]:
    """kind -> {"versions": {name: strict openAPIV3Schema}, "scope": ...} from the package."""
    crd_dir = files("dask_kubernetes.operator").joinpath(
        "deployment/helm/dask-kubernetes-operator/crds"
    )
    crds = {}
    for entry in crd_dir.iterdir():
        if not entry.name.endswith(".yaml"):
            continue
        crd = yaml.load(entry.read_text(), Loader=_YAML_LOADER)
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == GROUP
        versions = {
            v["name"]: _strict(v["schema"]["openAPIV3Schema"])
            for v in crd["spec"]["versions"]
            if v.get("served", False)
        }
        crds[crd["spec"]["names"]["kind"]] = {"versions": versions}
    return crds


def _strict(schema):
    """A copy of an OpenAPI v3 schema that rejects unknown fields and understands ``nullable``.

    The API server prunes (or, with strict field validation, rejects) fields that a structural
    schema does not declare, unless ``x-kubernetes-preserve-unknown-fields`` says to keep them.
    """
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields", False)
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _metadata_errors(doc: dict) -> list[str]:
    """apiVersion, kind and metadata, which the CRDs' root schemas leave out."""
    errors = []
    kind = doc.get("kind")
    if kind not in _crds():
        return [f"kind {kind!r} is not one of the operator's {sorted(_crds())}"]
    group, _, version = str(doc.get("apiVersion", "")).partition("/")
    if group != GROUP or version not in _crds()[kind]["versions"]:
        errors.append(f"apiVersion {doc.get('apiVersion')!r} is not served for {kind}")
    unknown = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    if unknown:
        errors.append(f"unknown top-level fields {sorted(unknown)}")
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        return [*errors, "metadata is missing"]
    unknown = set(metadata) - {"name", "namespace", "labels", "annotations"}
    if unknown:
        errors.append(f"unknown metadata fields {sorted(unknown)}")
    name = metadata.get("name", "")
    # the operator derives Service and Pod names from it (e.g. "<name>-scheduler"): a DNS label
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 40:
        errors.append(f"metadata.name {name!r} is not a short DNS-1123 label")
    for field in ("labels", "annotations"):
        mapping = metadata.get(field, {})
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            errors.append(f"metadata.{field} must map strings to strings")
    return errors


def validation_errors(doc: dict) -> list[str]:
    """Every reason the API server (with the operator's CRDs) would refuse ``doc``."""
    errors = _metadata_errors(doc)
    if errors:
        return errors
    _, _, version = doc["apiVersion"].partition("/")
    schema = _crds()[doc["kind"]]["versions"][version]
    body = {key: value for key, value in doc.items() if key in ("spec",)}
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(body)
    ]


def _prune_nulls(value):
    """Drop null fields, as the API server does for fields that are not nullable."""
    if isinstance(value, dict):
        return {k: _prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune_nulls(v) for v in value]
    return value


def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _documents() -> list[tuple[str, dict]]:
    return [(f"{p.name}#{i}", doc) for p in MANIFESTS for i, doc in enumerate(_load_all(p))]


def _by_kind(kind: str) -> dict:
    (doc,) = [doc for _, doc in _documents() if doc["kind"] == kind]
    return doc


def _cluster_specs() -> list[tuple[str, dict]]:
    """(cluster name, DaskCluster spec) for the DaskCluster and the DaskJob's cluster."""
    cluster = _by_kind("DaskCluster")
    job = _by_kind("DaskJob")
    return [
        (cluster["metadata"]["name"], cluster["spec"]),
        # the operator names a DaskJob's cluster after the job
        (job["metadata"]["name"], job["spec"]["cluster"]["spec"]),
    ]


def _containers(doc: dict) -> list[dict]:
    if doc["kind"] == "DaskCluster":
        specs = [doc["spec"]["scheduler"]["spec"], doc["spec"]["worker"]["spec"]]
    elif doc["kind"] == "DaskJob":
        cluster = doc["spec"]["cluster"]["spec"]
        specs = [
            doc["spec"]["job"]["spec"],
            cluster["scheduler"]["spec"],
            cluster["worker"]["spec"],
        ]
    else:
        specs = []
    return [c for spec in specs for c in [*spec.get("initContainers", []), *spec["containers"]]]


# ---- the validator itself ------------------------------------------------------------------------


def test_crds_ship_full_pod_specs():
    """The CRDs embed the whole PodSpec (no preserve-unknown-fields), so strictness reaches pods."""
    cluster = _crds()["DaskCluster"]["versions"]["v1"]
    worker_pod = cluster["properties"]["spec"]["properties"]["worker"]["properties"]["spec"]
    container = worker_pod["properties"]["containers"]["items"]
    assert container["additionalProperties"] is False
    assert container["properties"]["args"] == {"items": {"type": "string"}, "type": "array"}
    assert "name" in container["required"]
    assert set(_crds()) == {"DaskCluster", "DaskJob", "DaskWorkerGroup", "DaskAutoscaler"}


def _mutations():
    def misspelled_replicas(doc):
        doc["spec"]["worker"]["replica"] = doc["spec"]["worker"].pop("replicas")

    def misspelled_container_field(doc):
        doc["spec"]["worker"]["spec"]["containers"][0]["imagee"] = "distumap:0.1.0"

    def integer_arg(doc):
        doc["spec"]["worker"]["spec"]["containers"][0]["args"].append(1)

    def integer_cpu(doc):
        doc["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 1

    def missing_containers(doc):
        del doc["spec"]["scheduler"]["spec"]["containers"]

    def unknown_top_level(doc):
        doc["status"] = {"phase": "Running"}  # a status is the operator's, not ours
        doc["extra"] = True

    def wrong_api_version(doc):
        doc["apiVersion"] = "kubernetes.dask.org/v1beta1"

    def bad_name(doc):
        doc["metadata"]["name"] = "Distumap_Cluster"

    return [
        misspelled_replicas,
        misspelled_container_field,
        integer_arg,
        integer_cpu,
        missing_containers,
        unknown_top_level,
        wrong_api_version,
        bad_name,
    ]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_validator_rejects_broken_manifests(mutate):
    doc = copy.deepcopy(_by_kind("DaskCluster"))
    assert validation_errors(doc) == []
    mutate(doc)
    errors = validation_errors(doc)
    assert errors, f"{mutate.__name__} was accepted"


def test_validator_names_the_misspelled_field():
    doc = copy.deepcopy(_by_kind("DaskCluster"))
    doc["spec"]["worker"]["replica"] = doc["spec"]["worker"].pop("replicas")
    (error,) = validation_errors(doc)
    assert error.startswith("spec.worker:") and "'replica' was unexpected" in error


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "image": "distumap:0.1.0",
            "n_workers": 3,
            "resources": {"requests": {"cpu": "1"}, "limits": {"memory": "6Gi"}},
            "env": {"DASK_DISTUMAP__LANDMARKS": "50000"},
            "scheduler_service_type": "LoadBalancer",
            "idle_timeout": 600,
        },
    ],
    ids=["defaults", "options"],
)
def test_validator_accepts_the_operators_own_cluster_spec(options):
    from dask_kubernetes.operator import make_cluster_spec, make_worker_spec

    spec = _prune_nulls(make_cluster_spec("from-helper", **options))
    assert validation_errors(spec) == []
    # and a DaskWorkerGroup built from the helper's worker spec
    group = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "DaskWorkerGroup",
        "metadata": {"name": "from-helper-extra"},
        "spec": {"cluster": "from-helper", "worker": _prune_nulls(make_worker_spec())},
    }
    assert validation_errors(group) == []


# ---- deploy/kubernetes -------------------------------------------------------------------------


def test_every_manifest_is_a_known_custom_resource():
    kinds = sorted(doc["kind"] for _, doc in _documents())
    assert kinds == ["DaskAutoscaler", "DaskCluster", "DaskJob"]


@pytest.mark.parametrize("name, doc", _documents(), ids=[name for name, _ in _documents()])
def test_manifest_validates_strictly(name, doc):
    assert validation_errors(doc) == []


def _quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity in bytes (binary and decimal suffixes)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTPE]i?)?", quantity)
    assert match, f"not a memory quantity: {quantity!r}"
    number, suffix = float(match.group(1)), match.group(2) or ""
    powers = {"K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
    base = 1024 if suffix.endswith("i") else 1000
    return int(number * base ** powers[suffix[0]]) if suffix else int(number)


def _option(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.parametrize("name, doc", _documents(), ids=[name for name, _ in _documents()])
def test_container_essentials(name, doc):
    for container in _containers(doc):
        label = f"{name} container {container['name']}"
        assert isinstance(container.get("image"), str) and container["image"], label
        # args only: `command` would replace the image's entrypoint (tini as PID 1)
        assert "command" not in container, label
        args = container["args"]
        assert isinstance(args, list) and args and all(isinstance(a, str) for a in args), label
        ports = container.get("ports", [])
        port_names = [port["name"] for port in ports]
        assert len(set(port_names)) == len(port_names), label
        for port in ports:
            assert 1 <= port["containerPort"] <= 65535, label
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", port["name"]), label
            assert len(port["name"]) <= 15, label  # IANA service name limit
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            memory = resources.get(kind, {}).get("memory")
            if memory is not None:
                assert _quantity_bytes(memory) > 0, label
        if "memory" in resources.get("limits", {}) and "memory" in resources.get("requests", {}):
            limits, requests = resources["limits"], resources["requests"]
            assert _quantity_bytes(requests["memory"]) <= _quantity_bytes(limits["memory"]), label
    images = {container["image"] for container in _containers(doc)}
    assert len(images) <= 1, f"{name}: client, scheduler and workers must share one image"


@pytest.mark.parametrize("cluster_name, spec", _cluster_specs(), ids=["DaskCluster", "DaskJob"])
def test_cluster_shape(cluster_name, spec):
    (scheduler,) = spec["scheduler"]["spec"]["containers"]
    (worker,) = spec["worker"]["spec"]["containers"]
    assert scheduler["args"][:2] == ["dask", "scheduler"]
    assert _option(scheduler["args"], "--preload") == "distumap.dashboard"
    ports = {port["name"]: port["containerPort"] for port in scheduler["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    service = spec["scheduler"]["service"]
    assert service["selector"] == {
        "dask.org/cluster-name": cluster_name,
        "dask.org/component": "scheduler",
    }
    assert {(p["port"], p["targetPort"]) for p in service["ports"]} == {
        (8786, "tcp-comm"),
        (8787, "http-dashboard"),
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert scheduler[probe]["httpGet"] == {"port": "http-dashboard", "path": "/health"}

    args = worker["args"]
    assert args[:2] == ["dask", "worker"]
    assert _option(args, "--nthreads") == "1"
    assert _option(args, "--name") == "$(DASK_WORKER_NAME)"  # the operator sets it
    # the worker's memory budget fits in the container, with room for the nanny process
    memory_limit = parse_bytes(_option(args, "--memory-limit"))
    container_limit = _quantity_bytes(worker["resources"]["limits"]["memory"])
    assert 0.8 * container_limit <= memory_limit < container_limit
    assert worker["resources"]["requests"]["memory"] == worker["resources"]["limits"]["memory"]
    local_directory = _option(args, "--local-directory")
    mounts = {m["mountPath"] for m in worker.get("volumeMounts", [])}
    assert local_directory in mounts, "spill space must be a mounted volume"
    assert spec["worker"]["replicas"] >= 1


def test_job_runner():
    job = _by_kind("DaskJob")["spec"]["job"]["spec"]
    # the operator waits for the runner pod to succeed or fail; "Always" would restart it
    assert job["restartPolicy"] == "Never"
    (runner,) = job["containers"]
    assert runner["args"][:2] == ["distumap", "run"]
    env = {item["name"]: item["value"] for item in runner.get("env", [])}
    # the operator injects the scheduler's address; setting it here would point elsewhere
    assert "DASK_SCHEDULER_ADDRESS" not in env
    assert env["DASK_DISTUMAP__LANDMARKS"] == "50000"


def test_job_env_sets_distumap_config():
    """DASK_DISTUMAP__* names existing settings, and dask parses them to the default's type."""
    from distumap import _config

    (runner,) = _by_kind("DaskJob")["spec"]["job"]["spec"]["containers"]
    env = {
        item["name"]: item["value"] for item in runner["env"] if item["name"].startswith("DASK_")
    }
    assert env
    config = dask.config.collect_env(env)
    assert set(config) == {"distumap"}
    with dask.config.set(config):
        for name in config["distumap"]:
            key = name.replace("_", "-")
            assert key in _config.DEFAULTS, f"{name} is not a distumap setting"
            value = _config.get(key)
            assert type(value) is type(_config.DEFAULTS[key])
        assert _config.get("landmarks") == 50000
        assert _config.get("pca") == 50


def test_autoscaler_targets_the_cluster():
    autoscaler = _by_kind("DaskAutoscaler")["spec"]
    assert autoscaler["cluster"] == _by_kind("DaskCluster")["metadata"]["name"]
    assert 1 <= autoscaler["minimum"] <= autoscaler["maximum"]


def _kustomization() -> dict:
    return yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())


def test_kustomization_lists_every_manifest():
    kustomization = _kustomization()
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)
    (image,) = kustomization["images"]
    images = {c["image"] for _, doc in _documents() for c in _containers(doc)}
    assert images == {f"{image['name']}:0.1.0"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
def test_kustomize_render_validates():
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert sorted(doc["kind"] for doc in docs) == ["DaskAutoscaler", "DaskCluster", "DaskJob"]
    for doc in docs:
        assert validation_errors(doc) == [], doc["kind"]
    (image,) = _kustomization()["images"]
    expected = f"{image['newName']}:{image['newTag']}"
    containers = [c for doc in docs for c in _containers(doc)]
    assert len(containers) == 5
    assert {c["image"] for c in containers} == {expected}


# ---- the CLI the manifests and the HPC example call ---------------------------------------------


def _parse_cli(argv: list[str]):
    from distumap.cli import build_parser

    assert argv[0] == "distumap"
    return build_parser().parse_args(argv[1:])


def test_job_runner_command_parses():
    (runner,) = _by_kind("DaskJob")["spec"]["job"]["spec"]["containers"]
    namespace = _parse_cli(runner["args"])
    values = {str(x) for v in vars(namespace).values() for x in (v if isinstance(v, list) else [v])}
    assert {
        "s3://bucket/matrix.csv",
        "s3://bucket/metadata.csv",
        "s3://bucket/out",
        "subclass_label",
    } <= values


def test_slurm_example():
    spec = importlib.util.spec_from_file_location("distumap_slurm", DEPLOY / "hpc" / "slurm.py")
    slurm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slurm)  # imports nothing beyond the standard library at load time
    args = slurm.build_parser().parse_args(
        ["--queue", "normal", "--jobs", "3", "--", "m.csv", "--out", "out", "--color", "c"]
    )
    assert args.jobs == 3 and args.distumap_args == ["--", "m.csv", "--out", "out", "--color", "c"]
    namespace = _parse_cli(
        ["distumap", "run", *args.distumap_args[1:], "--scheduler-file", "sched.json"]
    )
    assert {"m.csv", "out", "c", "sched.json"} <= {
        str(x) for v in vars(namespace).values() for x in (v if isinstance(v, list) else [v])
    }


@pytest.mark.skipif(
    importlib.util.find_spec("dask_jobqueue") is None, reason="dask-jobqueue is not installed"
)
def test_slurm_job_script(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "hpc" / "slurm.py"),
            "--dry-run",
            "--queue",
            "normal",
            "--cores",
            "4",
            "--memory",
            "16GB",
            "--scheduler-file",
            str(tmp_path / "s.json"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert "#SBATCH -p normal" in result.stdout
    assert "--nthreads 1" in result.stdout and "--nworkers 4" in result.stdout


# ---- the image ---------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_dockerfile_pins_versions_that_distumap_admits_and_builds_with_the_clients():
    # the workers must run the client's dask and distributed: the image pins both exactly, the
    # build takes the client's versions (its header says how), and the defaults are versions a
    # fresh install of distumap may get. Not the versions installed here: a fresh install on
    # the day dask releases gets the new one, and the image's default is not wrong for that
    from packaging.requirements import Requirement
    from packaging.version import Version

    text = _dockerfile()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requires = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    for name, arg in (("dask", "DASK_VERSION"), ("distributed", "DISTRIBUTED_VERSION")):
        assert Version(args[arg]) in requires[name].specifier, (name, args[arg])
        asked = f"--build-arg {arg}=\"$(python -c 'import {name}; print({name}.__version__)')\""
        assert asked in text
    assert args["DASK_VERSION"] == args["DISTRIBUTED_VERSION"]  # released together
    assert args["PYTHON_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert "FROM python:${PYTHON_VERSION}-slim" in text
    assert '"dask[array]==${DASK_VERSION}"' in text
    assert '"distributed==${DISTRIBUTED_VERSION}"' in text


def test_dockerfile_runs_as_non_root_with_an_exec_entrypoint():
    text = _dockerfile()
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert users[-1].isdigit(), "a numeric uid lets runAsNonRoot verify it"
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", text, flags=re.M)
    assert entrypoint.startswith("["), "exec form, so Kubernetes args append to it"
    # pods run as the same uid the image declares
    for _, doc in _documents():
        if doc["kind"] == "DaskAutoscaler":
            continue
        for pod in _pod_specs(doc):
            assert pod["securityContext"]["runAsUser"] == int(users[-1])


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "DaskCluster":
        return [doc["spec"]["scheduler"]["spec"], doc["spec"]["worker"]["spec"]]
    cluster = doc["spec"]["cluster"]["spec"]
    return [doc["spec"]["job"]["spec"], cluster["scheduler"]["spec"], cluster["worker"]["spec"]]


def test_dockerfile_copies_what_exists():
    """Every COPY source is in the build context (the repository root) and not ignored."""
    text = _dockerfile()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _ = shlex.split(line)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by the dockerignore"
