"""Every manifest under deploy/k8s against the CRD the KubeRay operator installs, read as strictly as
`kubectl apply` reads it (an unknown field is an error), plus what the schema cannot say: the submitter
reaches the dashboard and carries the token.

schemas/kuberay-ray.io_rayjobs.yaml is KubeRay's RayJob CRD, unchanged (ray-project/kuberay,
ray-operator/config/crd/bases/ray.io_rayjobs.yaml, commit feeaf72 of 2026-08-19; Apache-2.0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
CRDS = [Path(__file__).parent / "schemas" / "kuberay-ray.io_rayjobs.yaml"]
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1.4 MB of YAML


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones (kubectl's strict field
    validation); `x-kubernetes-preserve-unknown-fields` keeps a node open, as the API server does."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: strict(value) for key, value in schema.items() if key != "properties"}
    if "properties" in schema:  # a map of field names, each to a schema
        closed["properties"] = {name: strict(value) for name, value in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            closed["additionalProperties"] = False
    return closed


def schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict openAPIV3Schema of every served version of every CRD."""
    found = {}
    for path in CRDS:
        crd = yaml.load(path.read_text(), Loader=LOADER)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                found[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return found


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict]:
    return schemas()


def test_deploy_k8s_has_manifests():
    assert MANIFESTS, "no manifests under deploy/k8s"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_crd_schema(path, crd_schemas):
    for doc in documents(path):
        key = (doc.get("apiVersion"), doc.get("kind"))
        assert key in crd_schemas, f"{path.name}: no schema for {key} (known: {sorted(crd_schemas)})"
        errors = sorted(jsonschema.Draft7Validator(crd_schemas[key]).iter_errors(doc), key=str)
        assert not errors, f"{path.name}:\n" + "\n".join(
            f"  {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )


def test_strict_schema_refuses_a_misspelt_field(crd_schemas):
    doc = documents(ROOT / "deploy" / "k8s" / "rayjob-freebase.yaml")[0]
    doc["spec"]["rayClusterSpec"]["authOption"] = doc["spec"]["rayClusterSpec"].pop("authOptions")
    errors = list(jsonschema.Draft7Validator(crd_schemas[("ray.io/v1", "RayJob")]).iter_errors(doc))
    assert any("authOption" in e.message for e in errors)


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_submitter_reaches_the_dashboard_with_a_token(path):
    """KubeRay's submitter pod calls the dashboard through the head Service, so the dashboard must not
    listen on loopback only; with token auth the operator hands the token to every Ray container and to
    the submitter, which a token set by hand in the pod templates never reaches."""
    for doc in documents(path):
        if doc["kind"] != "RayJob" or "rayClusterSpec" not in doc["spec"]:
            continue
        cluster = doc["spec"]["rayClusterSpec"]
        host = cluster["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "0.0.0.0")
        assert host not in ("127.0.0.1", "localhost", "::1"), f"{path.name}: dashboard-host {host}"
        assert cluster.get("authOptions", {}).get("mode") == "token", f"{path.name}: token auth off"
        for container in containers(cluster):
            by_hand = {env["name"] for env in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
            assert not by_hand, f"{path.name}: {container['name']} sets {by_hand}; authOptions does"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_gpu_containers_use_the_gpu_image(path):
    for doc in documents(path):
        if doc["kind"] != "RayJob" or "rayClusterSpec" not in doc["spec"]:
            continue
        for container in containers(doc["spec"]["rayClusterSpec"]):
            resources = container.get("resources", {})
            gpus = any("nvidia.com/gpu" in resources.get(kind, {}) for kind in ("limits", "requests"))
            assert gpus == container["image"].endswith("-gpu"), f"{path.name}: {container['name']}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_entrypoint_config_is_one_the_image_ships(path):
    """The image links the shipped configs at /opt/nvkg/configs (Dockerfile)."""
    for doc in documents(path):
        words = doc["spec"].get("entrypoint", "").split()
        if "--config" in words:
            config = Path(words[words.index("--config") + 1])
            assert config.parent == Path("/opt/nvkg/configs"), config
            assert (ROOT / "configs" / config.name).is_file(), config
