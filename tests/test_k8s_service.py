"""k8s/overlays/service: the RayService renders, its cluster validates against the KubeRay RayCluster schema,
its Serve config imports the application and names only real settings, and it has probes and limits."""

from __future__ import annotations

import importlib

import pytest
import yaml

from pipeline.serve.settings import ServeSettings
from tests.test_k8s import CRDS, K8S, load_crd_validators, pod_specs, render


def _service() -> dict:
    resources = render(K8S / "overlays" / "service")
    assert [r["kind"] for r in resources] == ["RayService"]
    return resources[0]


def test_the_rayservice_cluster_validates_against_the_raycluster_crd():
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (../shared absent)")
    service = _service()
    validator = load_crd_validators()["RayCluster"]  # strict: unknown fields are errors
    cluster = type(validator)(validator.schema["properties"]["spec"])
    assert [e.message for e in cluster.iter_errors(service["spec"]["rayClusterConfig"])] == []
    assert set(service["spec"]) == {"serveConfigV2", "rayClusterConfig"}


def test_the_serve_config_builds_our_application_with_known_settings():
    config = yaml.safe_load(_service()["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    module, name = application["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    fields = set(ServeSettings.__dataclass_fields__)
    assert set(application["args"]) <= fields


def test_every_container_has_probes_limits_and_the_one_image():
    specs = list(pod_specs(_service()))
    containers = [c for spec in specs for c in spec["containers"]]
    assert len(containers) == 3
    for container in containers:
        assert container["image"] == "registry.example.com/landmark-index:0.1.0-cuda13.2"
        assert "livenessProbe" in container and container["resources"]["limits"]
        assert container["securityContext"]["runAsNonRoot"] is True
    head = specs[0]["containers"][0]
    assert head["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
