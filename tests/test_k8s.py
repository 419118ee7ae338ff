"""Offline checks of the Kubernetes deployment (k8s/) and the runtime image (Dockerfile).

The overlays are rendered by `render`, a minimal kustomize for exactly the subset k8s/ uses (resources,
components, secretGenerator without name hashes, namespace, labels, images, patches as strategic-merge
without lists / RFC 6902 / `$patch: delete`, replacements); it raises on anything else instead of ignoring it. Where `kubectl kustomize` exists, the
renderer's output must equal it. Core kinds are validated with kubernetes-validate (strict), ray.io kinds
with jsonschema against the KubeRay CRDs in ../shared (made strict: unknown fields are errors, as with
the API server's strict field validation).
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CRDS = SHARED / "data" / "kuberay-crds"
OVERLAYS = ("dev-cpu", "prod-gpu", "prod-gpu-raycronjob", "index-manifest", "raycluster")
K8S_VERSION = "1.33"
RAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "patches",
    "replacements",
    "components",
    "secretGenerator",
}

Resource = dict[str, Any]


# ----------------------------------------------------------------------------- minimal kustomize


def render(directory: Path, accumulated: list[Resource] | None = None) -> list[Resource]:
    """Build a kustomization the way kustomize does for the supported subset.

    Order of one level (kustomize's): resources (recursively built), components (each a level of its own,
    applied to what is accumulated so far), generators, then the transformers patches, namespace, labels,
    images, replacements. A Component renders onto ``accumulated``.
    """
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise ValueError(
            f"{directory}: fields {sorted(unsupported)} not supported; allowed: {SUPPORTED_FIELDS}"
        )
    if (kustomization.get("kind") == "Component") != (accumulated is not None):
        raise ValueError(f"{directory}: a Component is only used under `components:`, nothing else is")
    resources: list[Resource] = accumulated if accumulated is not None else []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in kustomization.get("components", []):
        resources = render(directory / entry, resources)
    resources += [
        generate_secret(directory, generator) for generator in kustomization.get("secretGenerator", [])
    ]
    for patch in kustomization.get("patches", []):
        resources = apply_patch(resources, patch, directory)
    if "namespace" in kustomization:
        set_namespace(resources, kustomization["namespace"])
    for label_set in kustomization.get("labels", []):
        add_labels(resources, label_set)
    for image in kustomization.get("images", []):
        for resource in resources:
            set_images(resource, image)
    for replacement in kustomization.get("replacements", []):
        replace(resources, replacement)
    return resources


def generate_secret(directory: Path, generator: dict[str, Any]) -> Resource:
    """A secretGenerator entry with ``envs`` files and a fixed name (``disableNameSuffixHash``): a hashed name
    would need kustomize's rewriting of every reference, which this renderer does not do."""
    if set(generator) != {"name", "envs", "options"} or generator["options"] != {
        "disableNameSuffixHash": True
    }:
        raise ValueError(f"secretGenerator {generator}: name, envs and options.disableNameSuffixHash only")
    data = {}
    for env in generator["envs"]:
        for line in (directory / env).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, value = line.split("=", 1)
                data[key.strip()] = base64.b64encode(value.encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": generator["name"]},
        "type": "Opaque",
        "data": data,
    }


def identity(resource: Resource) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def selects(selector: dict[str, str], resource: Resource) -> bool:
    unsupported = set(selector) - {"kind", "name", "labelSelector"}
    if unsupported:
        raise ValueError(
            f"selector fields {sorted(unsupported)} not supported; allowed: kind, name, labelSelector"
        )
    labels = resource["metadata"].get("labels", {})
    wanted_labels = dict(pair.split("=", 1) for pair in selector.get("labelSelector", "").split(",") if pair)
    return (
        selector.get("kind", resource["kind"]) == resource["kind"]
        and selector.get("name", resource["metadata"]["name"]) == resource["metadata"]["name"]
        and all(labels.get(key) == value for key, value in wanted_labels.items())
    )


def apply_patch(resources: list[Resource], patch: dict[str, Any], directory: Path) -> list[Resource]:
    text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    target = patch.get("target")
    if len(documents) == 1 and isinstance(documents[0], list):
        if target is None:
            raise ValueError(f"JSON patch {patch} needs a target")
        for resource in resources:
            if selects(target, resource):
                apply_json_patch(resource, documents[0])
        return resources
    kept = []
    for resource in resources:
        for document in documents:
            selector = target or {"kind": document["kind"], "name": document["metadata"]["name"]}
            if not selects(selector, resource):
                continue
            if document.get("$patch") == "delete":
                break
            merge_patch(resource, {k: v for k, v in document.items() if k not in ("apiVersion", "kind")})
        else:
            kept.append(resource)
    return kept


def merge_patch(node: dict[str, Any], patch: dict[str, Any]) -> None:
    """Strategic merge restricted to maps: kustomize merges lists of core kinds by key, so lists are refused."""
    for key, value in patch.items():
        if isinstance(value, list):
            raise ValueError(f"list under {key!r} in a strategic-merge patch: use a JSON patch (op: replace)")
        if value is None:
            node.pop(key, None)
        elif isinstance(value, dict) and isinstance(node.get(key), dict):
            merge_patch(node[key], value)
        else:
            node[key] = copy.deepcopy(value)


def apply_json_patch(resource: Resource, operations: list[dict[str, Any]]) -> None:
    for operation in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
        node: Any = resource
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = (len(node) if last == "-" else int(last)) if isinstance(node, list) else last
        if operation["op"] == "remove":
            del node[key]
        elif operation["op"] == "replace":
            if key not in (range(len(node)) if isinstance(node, list) else node):
                raise ValueError(f"JSON patch replaces {operation['path']}, which does not exist")
            node[key] = copy.deepcopy(operation["value"])
        elif operation["op"] == "add" and isinstance(node, list):
            node.insert(key, copy.deepcopy(operation["value"]))
        elif operation["op"] == "add":
            node[key] = copy.deepcopy(operation["value"])
        else:
            raise ValueError(
                f"JSON patch op {operation['op']!r} not supported; allowed: add, remove, replace"
            )


def set_namespace(resources: list[Resource], namespace: str) -> None:
    for resource in resources:
        if resource["kind"] in CLUSTER_SCOPED:
            continue
        resource["metadata"]["namespace"] = namespace
        for subject in resource.get("subjects", []) if resource["kind"] == "RoleBinding" else []:
            if subject["kind"] == "ServiceAccount":
                subject["namespace"] = namespace


def add_labels(resources: list[Resource], label_set: dict[str, Any]) -> None:
    if label_set.get("includeSelectors") or label_set.get("includeTemplates"):
        raise ValueError(f"labels {label_set}: includeSelectors/includeTemplates not supported")
    for resource in resources:
        resource["metadata"].setdefault("labels", {}).update(label_set["pairs"])


def image_name(image: str) -> str:
    """'registry:5000/a/b:tag@sha256:..' -> 'registry:5000/a/b'."""
    name = image.split("@", 1)[0]
    last_slash = name.rfind("/")
    return name[: name.rfind(":")] if name.rfind(":") > last_slash else name


def set_images(node: Any, image: dict[str, str]) -> None:
    """Like kustomize's images transformer: every `containers`/`initContainers` list at any depth.

    ``name`` with ``newTag`` and/or ``digest`` (a deployer pins by digest), optionally ``newName``:
    name[:tag][@digest], the old tag and digest dropped, as kustomize writes it.
    """
    if (
        "name" not in image
        or not set(image) <= {"name", "newName", "newTag", "digest"}
        or not ({"newTag", "digest"} & set(image))
    ):
        raise ValueError(f"images entry {image}: name with newTag and/or digest (and newName) is supported")
    if isinstance(node, list):
        for item in node:
            set_images(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                if image_name(container.get("image", "")) == image["name"]:
                    reference = image.get("newName", image["name"])
                    reference += f":{image['newTag']}" if "newTag" in image else ""
                    reference += f"@{image['digest']}" if "digest" in image else ""
                    container["image"] = reference
        set_images(value, image)


def replace(resources: list[Resource], replacement: dict[str, Any]) -> None:
    source_selector = {k: v for k, v in replacement["source"].items() if k != "fieldPath"}
    (source,) = [r for r in resources if selects(source_selector, r)]
    value = get_path(source, replacement["source"]["fieldPath"])
    for target in replacement["targets"]:
        create = target.get("options", {}).get("create", False)
        for resource in resources:
            if selects(target["select"], resource):
                for field_path in target["fieldPaths"]:
                    set_path(resource, field_path, copy.deepcopy(value), create)


def get_path(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = node[part]
    return node


def set_path(node: dict[str, Any], dotted: str, value: Any, create: bool) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        if part not in node and not create:
            return
        node = node.setdefault(part, {})
    if last in node or create:
        node[last] = value


# ----------------------------------------------------------------------------- rendered objects


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Resource]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[tuple[str, str], Resource]]:
    return {name: {identity(r): r for r in render(K8S / "overlays" / name)} for name in OVERLAYS}


def pod_specs(node: Any) -> Iterator[dict[str, Any]]:
    """Every PodSpec at any depth: a map with a `containers` list."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for value in node.values():
            yield from pod_specs(value)
    elif isinstance(node, list):
        for item in node:
            yield from pod_specs(item)


def cluster_specs(resource: Resource) -> list[dict[str, Any]]:
    """The RayCluster specs a resource creates."""
    if resource["kind"] == "RayCluster":
        return [resource["spec"]]
    if resource["kind"] == "RayJob":
        return [resource["spec"]["rayClusterSpec"]]
    if resource["kind"] == "RayCronJob":
        return [resource["spec"]["jobTemplate"]["rayClusterSpec"]]
    return []


def entrypoints(resources: dict[tuple[str, str], Resource]) -> dict[tuple[str, str], str]:
    found = {}
    for key, resource in resources.items():
        if resource["kind"] == "RayJob":
            found[key] = resource["spec"]["entrypoint"]
        elif resource["kind"] == "RayCronJob":
            found[key] = resource["spec"]["jobTemplate"]["entrypoint"]
    return found


def dockerfile_value(instruction: str) -> str:
    lines = [
        line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith(instruction + " ")
    ]
    assert len(lines) == 1, f"expected one {instruction} in the Dockerfile, found {lines}"
    return lines[0].split(" ", 1)[1].strip()


# ----------------------------------------------------------------------------- the renderer itself


@pytest.mark.parametrize("name", OVERLAYS)
def test_renderer_equals_kubectl_kustomize(name: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the minimal renderer is not cross-checked against kustomize")
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / name)], capture_output=True, text=True, timeout=120
    )
    assert built.returncode == 0, built.stderr
    expected = {identity(r): r for r in yaml.safe_load_all(built.stdout) if r}
    assert {identity(r): r for r in render(K8S / "overlays" / name)} == expected


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonAnnotations: {a: b}\n")
    with pytest.raises(ValueError, match="commonAnnotations"):
        render(tmp_path)
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n- patch: '{kind: ConfigMap, metadata: {name: c}, data: {l: [1]}}'\n"
    )
    with pytest.raises(ValueError, match="list under 'l'"):
        render(tmp_path)


def test_renderer_transformers_on_a_small_kustomization(tmp_path: Path) -> None:
    (tmp_path / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {x: y}}\n"
        "spec: {containers: [{name: c, image: 'reg:5000/app:old'}, {name: d, image: other:1}]}\n---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: gone}\n"
    )
    (tmp_path / "kustomization.yaml").write_text(
        "namespace: ns\nresources: [pod.yaml]\nlabels: [{pairs: {team: t}}]\n"
        "images: [{name: 'reg:5000/app', newName: r/app, newTag: '2'}]\n"
        "patches:\n- target: {kind: ConfigMap}\n  patch: '{$patch: delete, kind: X, metadata: {name: x}}'\n"
        "- target: {kind: Pod, name: p}\n  patch: '[{op: add, path: /spec/containers/-, value: {name: e}}]'\n"
    )
    (pod,) = render(tmp_path)
    assert pod["metadata"] == {"name": "p", "namespace": "ns", "labels": {"x": "y", "team": "t"}}
    assert pod["spec"]["containers"] == [
        {"name": "c", "image": "r/app:2"},
        {"name": "d", "image": "other:1"},
        {"name": "e"},
    ]


def test_renderer_pins_images_by_digest_like_kustomize(tmp_path: Path) -> None:
    """How a deployer overrides the kubectl image's digest (README): an `images:` entry with `digest`."""
    (tmp_path / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: ["
        f"{{name: a, image: 'alpine/k8s:1.33.4@sha256:{'0' * 64}'}}, {{name: b, image: 'reg/app:1'}}]}}\n"
    )
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [pod.yaml]\nimages:\n- {{name: alpine/k8s, digest: 'sha256:{'1' * 64}'}}\n"
        f"- {{name: reg/app, newTag: '2', digest: 'sha256:{'2' * 64}'}}\n"
    )
    (pod,) = render(tmp_path)
    assert [c["image"] for c in pod["spec"]["containers"]] == [
        f"alpine/k8s@sha256:{'1' * 64}",
        f"reg/app:2@sha256:{'2' * 64}",
    ]
    if shutil.which("kubectl"):
        built = subprocess.run(
            ["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120, check=True
        )
        assert yaml.safe_load(built.stdout) == pod


# ----------------------------------------------------------------------------- schema validation


def strict(schema: Any) -> Any:
    """Forbid unknown fields wherever the CRD lists the allowed ones (server-side strict validation)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    lists_fields = "properties" in schema and "additionalProperties" not in schema
    if lists_fields and not schema.get("x-kubernetes-preserve-unknown-fields"):
        result["additionalProperties"] = False
    return result


HAS_ONLY_RULE = re.compile(r"(?:has\(self\.\w+\)|&&|\|\||[!()\s])+")


def cel_errors(schema: dict[str, Any], instance: Any, path: str = "") -> list[str]:
    """The CRD's CEL rules (``x-kubernetes-validations``) that ``instance`` breaks, as the API server checks them.

    Only rules built from ``has(self.f)``, ``!``, ``&&``, ``||`` and parentheses are evaluated (translated to
    Python); others (transition rules like ``self == oldSelf``, value rules) are left to the server.
    """
    errors = []
    if isinstance(instance, dict):
        for validation in schema.get("x-kubernetes-validations", []):
            rule = validation["rule"]
            if not HAS_ONLY_RULE.fullmatch(rule):
                continue
            python = re.sub(r"has\(self\.(\w+)\)", r"('\1' in self)", rule)
            python = python.replace("&&", " and ").replace("||", " or ").replace("!", " not ")
            if not eval(
                python, {"__builtins__": {}}, {"self": instance}
            ):  # CRD text, vetted by HAS_ONLY_RULE
                errors.append(f"{path or '/'}: {validation['message']}")
        for key, value in instance.items():
            child = schema.get("properties", {}).get(key) or schema.get("additionalProperties")
            if isinstance(child, dict):
                errors += cel_errors(child, value, f"{path}/{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            errors += cel_errors(schema["items"], item, f"{path}/{i}")
    return errors


DELETION_ORDER = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")  # TTLs must not decrease along it


def kuberay_cleanup_problems(job: dict[str, Any]) -> list[str]:
    """What KubeRay's RayJob validation refuses in a spec's cleanup settings.

    Restates the checks of ray-operator/controllers/ray/utils/validation.go (KubeRay v1.7.0,
    ValidateRayJobSpec / validateDeletionConfiguration / validateDeletionRules) that the CRD schema cannot
    express: they run in the operator, so a spec breaking them passes `kubectl apply` and then fails.
    """
    problems = []
    shutdown = job.get("shutdownAfterJobFinishes", False)
    if job.get("suspend") and not shutdown:
        problems.append("a suspended RayJob needs shutdownAfterJobFinishes")
    if not shutdown and job.get("ttlSecondsAfterFinished", 0) > 0:
        problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    rules = job.get("deletionStrategy", {}).get("deletionRules", [])
    if rules and shutdown:
        problems.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
    autoscaling = job.get("rayClusterSpec", {}).get("enableInTreeAutoscaling", False)
    ttls: dict[tuple[str, str], dict[str, int]] = {}
    for i, rule in enumerate(rules):
        condition, policy = rule["condition"], rule["policy"]
        statuses = [(key, condition[key]) for key in ("jobStatus", "jobDeploymentStatus") if key in condition]
        if len(statuses) != 1:
            problems.append(f"rule {i}: exactly one of jobStatus and jobDeploymentStatus")
        elif policy == "DeleteWorkers" and autoscaling:
            problems.append(f"rule {i}: DeleteWorkers is not supported with autoscaling")
        elif policy in ttls.setdefault(statuses[0], {}):
            problems.append(f"rule {i}: duplicate rule for {policy} and {statuses[0]}")
        else:
            ttls[statuses[0]][policy] = condition.get("ttlSeconds", 0)
    for status, by_policy in ttls.items():
        ordered = [by_policy[policy] for policy in DELETION_ORDER if policy in by_policy]
        if ordered != sorted(ordered):
            problems.append(f"{status}: TTLs must not decrease along {DELETION_ORDER}: {by_policy}")
    return problems


@functools.cache
def load_crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 3 MB of YAML
    validators = {}
    for kind, plural in RAY_KINDS.items():
        crd = yaml.load((CRDS / f"ray.io_{plural}.yaml").read_text(), Loader=loader)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        validators[kind] = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    return validators


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (../shared absent): ray.io kinds not validated")
    return load_crd_validators()


def test_core_kinds_validate_against_kubernetes_schemas(overlay: tuple[str, list[Resource]]) -> None:
    core = [r for r in overlay[1] if r["apiVersion"] != "ray.io/v1"]
    assert "ConfigMap" in {r["kind"] for r in core}  # something to validate: every overlay ships a ConfigMap
    for resource in core:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)  # raises on any violation


def test_ray_kinds_validate_against_kuberay_crds(
    overlay: tuple[str, list[Resource]], crd_validators: dict[str, jsonschema.Draft7Validator]
) -> None:
    ray_resources = [r for r in overlay[1] if r["apiVersion"] == "ray.io/v1"]
    assert ray_resources
    for resource in ray_resources:
        validator = crd_validators[resource["kind"]]
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(resource)]
        errors += cel_errors(validator.schema, resource)
        assert not errors, f"{identity(resource)}: {errors[:5]}"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["spec", "enableInTreeAutoScaling"], True),  # misspelt field
        (["spec", "workerGroupSpecs", 0, "maxReplicas"], "4"),  # string for an integer
        (["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0),  # rayStartParams are strings
    ],
)
def test_crd_validation_rejects_bad_raycluster(
    rendered: dict[str, dict[tuple[str, str], Resource]],
    crd_validators: dict[str, jsonschema.Draft7Validator],
    path: list[Any],
    value: Any,
) -> None:
    bad = copy.deepcopy(rendered["raycluster"][("RayCluster", "landmark-index")])
    node = bad
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    assert not crd_validators["RayCluster"].is_valid(bad)


def test_cel_rules_reject_an_ambiguous_deletion_condition(
    rendered: dict[str, dict[tuple[str, str], Resource]],
    crd_validators: dict[str, jsonschema.Draft7Validator],
) -> None:
    bad = copy.deepcopy(rendered["prod-gpu-raycronjob"][("RayCronJob", "nightly-reindex")])
    rules = bad["spec"]["jobTemplate"]["deletionStrategy"]["deletionRules"]
    rules[0]["condition"]["jobDeploymentStatus"] = "Failed"  # beside its jobStatus
    rules[1]["condition"] = {"ttlSeconds": 60}  # neither status
    errors = cel_errors(crd_validators["RayCronJob"].schema, bad)
    where = "/spec/jobTemplate/deletionStrategy/deletionRules"
    assert [e.split(":")[0] for e in errors] == [f"{where}/0/condition", f"{where}/1/condition"]
    assert crd_validators["RayCronJob"].is_valid(bad)  # jsonschema alone would have let both through


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"shutdownAfterJobFinishes": True}, "mutually exclusive"),
        ({"ttlSecondsAfterFinished": 60}, "ttlSecondsAfterFinished needs"),
        ({"suspend": True}, "suspended RayJob"),
        ({"first_rule_ttl": 8 * 86400}, "decrease"),  # the cluster would outlive its RayJob
        ({"rule": {"policy": "DeleteWorkers", "condition": {"jobStatus": "FAILED"}}}, "autoscaling"),
        ({"rule": {"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED"}}}, "duplicate"),
    ],
)
def test_kuberay_cleanup_checks_catch_what_the_operator_refuses(
    rendered: dict[str, dict[tuple[str, str], Resource]], change: dict[str, Any], problem: str
) -> None:
    job = copy.deepcopy(
        rendered["prod-gpu-raycronjob"][("RayCronJob", "nightly-reindex")]["spec"]["jobTemplate"]
    )
    rules = job["deletionStrategy"]["deletionRules"]
    if "rule" in change:
        rules.append(change.pop("rule"))
    if "first_rule_ttl" in change:
        rules[0]["condition"]["ttlSeconds"] = change.pop("first_rule_ttl")
    job.update(change)
    (found,) = kuberay_cleanup_problems(job)
    assert problem in found


def test_core_validation_rejects_a_misspelt_cronjob_field(
    rendered: dict[str, dict[tuple[str, str], Resource]],
) -> None:
    bad = copy.deepcopy(rendered["prod-gpu"][("CronJob", "nightly-reindex")])
    bad["spec"]["concurrencyPolcy"] = bad["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# ----------------------------------------------------------------------------- security and resources


def test_every_container_is_non_root_with_limits(overlay: tuple[str, list[Resource]]) -> None:
    for resource in overlay[1]:
        for pod in pod_specs(resource):
            pod_context = pod.get("securityContext", {})
            volumes = {volume["name"] for volume in pod.get("volumes", [])}
            for container in pod["containers"] + pod.get("initContainers", []):
                where = f"{overlay[0]} {identity(resource)} container {container['name']}"
                context = {**pod_context, **container.get("securityContext", {})}
                assert context.get("runAsNonRoot") is True, where
                assert context.get("runAsUser", 0) > 0, where
                assert context.get("allowPrivilegeEscalation") is False, where
                assert context.get("capabilities", {}).get("drop") == ["ALL"], where
                assert context.get("readOnlyRootFilesystem") is True, where
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container.get("resources", {}).get(kind, {})), where
                mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
                assert set(mounts.values()) <= volumes, f"{where}: mounts a volume the pod lacks"


def test_ray_nodes_have_writable_ray_paths(overlay: tuple[str, list[Resource]]) -> None:
    for resource in overlay[1]:
        for cluster in cluster_specs(resource):
            groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
            for group in groups:
                for container in group["template"]["spec"]["containers"]:
                    mounted = {mount["mountPath"] for mount in container["volumeMounts"]}
                    assert {"/tmp", "/dev/shm", "/home/ray"} <= mounted, (overlay[0], identity(resource))
            autoscaler = cluster["autoscalerOptions"]
            assert {"cpu", "memory"} <= set(autoscaler["resources"]["limits"])
            assert autoscaler["securityContext"]["runAsNonRoot"] is True
            assert autoscaler["securityContext"]["capabilities"]["drop"] == ["ALL"]


OBJECT_STORE_SECRET = "landmark-index-object-store"


def secret_refs(node: Any) -> Iterator[dict[str, Any]]:
    """Every envFrom secretRef at any depth."""
    if isinstance(node, dict):
        if isinstance(node.get("secretRef"), dict):
            yield node["secretRef"]
        for value in node.values():
            yield from secret_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from secret_refs(item)


def test_no_secret_but_the_dev_overlays_generated_one(overlay: tuple[str, list[Resource]]) -> None:
    """`kubectl apply -k` must never overwrite the real object-store keys: base and the production overlays
    ship no Secret (they reference one by name, optionally: cloud identity needs none); only dev-cpu
    generates one, from its own env file."""
    assert not [r for r in render_base() if r["kind"] == "Secret"]
    secrets = [r for r in overlay[1] if r["kind"] == "Secret"]
    refs = list(secret_refs(overlay[1]))
    assert refs and all(ref == {"name": OBJECT_STORE_SECRET, "optional": True} for ref in refs)
    if overlay[0] != "dev-cpu":
        assert secrets == []
        return
    (secret,) = secrets
    assert secret["metadata"]["name"] == OBJECT_STORE_SECRET
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def render_base() -> list[Resource]:
    """k8s/base as an overlay without changes sees it."""
    return render(K8S / "base")


def test_base_holds_only_what_every_deployment_needs() -> None:
    """The one-off index RayJob and the standalone RayCluster are opt-in (components + overlays)."""
    kinds = sorted(identity(r) for r in render_base())
    assert kinds == [
        ("ConfigMap", "landmark-index-config"),
        ("CronJob", "nightly-reindex"),
        ("RayJob", "nightly-reindex-template"),
        ("Role", "nightly-reindex-submitter"),
        ("RoleBinding", "nightly-reindex-submitter"),
        ("ServiceAccount", "landmark-index-job-submitter"),
        ("ServiceAccount", "landmark-index-ray"),
        ("ServiceAccount", "nightly-reindex-submitter"),
    ]


@pytest.mark.parametrize(
    ("name", "added"),
    [("index-manifest", ("RayJob", "index-manifest")), ("raycluster", ("RayCluster", "landmark-index"))],
)
def test_opt_in_overlays_add_one_resource_with_the_nightly_layout(
    rendered: dict[str, dict[tuple[str, str], Resource]], name: str, added: tuple[str, str]
) -> None:
    assert set(rendered[name]) - set(rendered["prod-gpu"]) == {added}
    assert not {("RayJob", "index-manifest"), ("RayCluster", "landmark-index")} & set(rendered["prod-gpu"])
    layout = rendered["prod-gpu"][("RayJob", "nightly-reindex-template")]["spec"]["rayClusterSpec"]
    (cluster,) = cluster_specs(rendered[name][added])
    assert cluster == layout


def pod_accounts(resource: Resource) -> dict[str, str]:
    """Role of each pod a resource creates → its serviceAccountName ('' when unset)."""
    accounts = {}
    for cluster in cluster_specs(resource):
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            accounts[f"ray:{group.get('groupName', 'head')}"] = group["template"]["spec"].get(
                "serviceAccountName", ""
            )
    if resource["kind"] in ("RayJob", "RayCronJob"):
        job = resource["spec"].get("jobTemplate", resource["spec"])
        accounts["submitter"] = job["submitterPodTemplate"]["spec"].get("serviceAccountName", "")
    if resource["kind"] == "CronJob":
        pod = resource["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        accounts["cron-submitter"] = pod.get("serviceAccountName", "")
    return accounts


def test_a_service_account_per_role(overlay: tuple[str, list[Resource]]) -> None:
    """Ray pods (cloud identity of the object store), RayJob submitters (none, no API token) and the CronJob
    submitter (RBAC on RayJobs) each run under an account of their own that the overlay ships."""
    resources = {identity(r): r for r in overlay[1]}
    roles: dict[str, set[str]] = {}
    for resource in resources.values():
        for role, account in pod_accounts(resource).items():
            roles.setdefault(role.split(":")[0], set()).add(account)
    expected = {"ray": {"landmark-index-ray"}, "submitter": {"landmark-index-job-submitter"}}
    if ("CronJob", "nightly-reindex") in resources:
        expected["cron-submitter"] = {"nightly-reindex-submitter"}
    assert roles == expected
    for (account,) in expected.values():
        assert ("ServiceAccount", account) in resources
    assert (
        resources[("ServiceAccount", "landmark-index-job-submitter")]["automountServiceAccountToken"] is False
    )


def test_cloud_identity_and_pull_secrets_are_set_through_an_overlay(tmp_path: Path) -> None:
    """What k8s/README.md tells an operator to write: IRSA / Workload Identity annotations on the Ray pods'
    account reach every Ray pod of every cluster; prod-gpu's imagePullSecrets reach every account."""
    annotations = {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/landmark-index",
        "iam.gke.io/gcp-service-account": "landmark-index@project.iam.gserviceaccount.com",
    }
    patch = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "landmark-index-ray"}}
    patch["metadata"]["annotations"] = annotations
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {"resources": [str(K8S / "overlays" / "raycluster")], "patches": [{"patch": json.dumps(patch)}]}
        )
    )
    resources = {identity(r): r for r in render(tmp_path)}
    assert resources[("ServiceAccount", "landmark-index-ray")]["metadata"]["annotations"] == annotations
    for resource in resources.values():
        for role, account in pod_accounts(resource).items():
            if role.startswith("ray:"):
                assert account == "landmark-index-ray", (identity(resource), role)
    for key, resource in resources.items():
        if key[0] == "ServiceAccount":
            assert resource["imagePullSecrets"] == [{"name": "registry-credentials"}], key
    readme = (K8S / "README.md").read_text()
    assert all(annotation in readme for annotation in annotations)


# ----------------------------------------------------------------------------- Ray layout


def gpu_count(container: dict[str, Any], kind: str) -> int:
    return int(container["resources"][kind].get("nvidia.com/gpu", 0))


def worker_groups(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {group["groupName"]: group for group in cluster["workerGroupSpecs"]}


@pytest.mark.parametrize("name", ["prod-gpu", "prod-gpu-raycronjob", "index-manifest", "raycluster"])
def test_gpu_clusters_autoscale_gpu_and_cpu_worker_groups_from_zero(
    rendered: dict[str, dict[tuple[str, str], Resource]], name: str
) -> None:
    """GPU workers are placed by the device plugin's nvidia.com/gpu resource and the usual taint's toleration,
    not by a node label that only the GPU Operator sets; a CPU group (decode, CPU re-ranking) starts at 0 too."""
    clusters = [c for r in rendered[name].values() for c in cluster_specs(r)]
    assert len(clusters) == (2 if name in ("index-manifest", "raycluster") else 1)
    for cluster in clusters:
        assert cluster["enableInTreeAutoscaling"] is True
        (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
        assert gpu_count(head, "limits") == 0
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        groups = worker_groups(cluster)
        assert set(groups) == {"gpu", "cpu"}
        assert (
            groups["gpu"]["minReplicas"]
            == groups["gpu"]["replicas"]
            == 0
            < groups["gpu"]["maxReplicas"]
            == 16
        )
        assert groups["cpu"]["minReplicas"] == groups["cpu"]["replicas"] == 0 < groups["cpu"]["maxReplicas"]
        pod = groups["gpu"]["template"]["spec"]
        (worker,) = pod["containers"]
        assert gpu_count(worker, "requests") == gpu_count(worker, "limits") >= 1
        assert "nodeSelector" not in pod and "affinity" not in pod  # node labels: the overlay's choice
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        (cpu_worker,) = groups["cpu"]["template"]["spec"]["containers"]
        assert gpu_count(cpu_worker, "limits") == 0 and "tolerations" not in groups["cpu"]["template"]["spec"]


def test_dev_cpu_requests_no_gpu(rendered: dict[str, dict[tuple[str, str], Resource]]) -> None:
    assert "nvidia.com/gpu" not in json.dumps(list(rendered["dev-cpu"].values()))
    cluster = rendered["dev-cpu"][("RayJob", "nightly-reindex-template")]["spec"]["rayClusterSpec"]
    assert list(worker_groups(cluster)) == ["cpu"]
    assert worker_groups(cluster)["cpu"]["maxReplicas"] == 2
    assert rendered["dev-cpu"][("CronJob", "nightly-reindex")]["spec"]["suspend"] is True


def ray_jobs(resources: dict[tuple[str, str], Resource]) -> list[dict[str, Any]]:
    """The RayJob specs an overlay creates: RayJobs and the RayCronJob's template."""
    jobs = [r["spec"] for r in resources.values() if r["kind"] == "RayJob"]
    return jobs + [r["spec"]["jobTemplate"] for r in resources.values() if r["kind"] == "RayCronJob"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_rayjobs_run_on_the_overlays_cluster_layout_and_clean_up(
    rendered: dict[str, dict[tuple[str, str], Resource]], name: str
) -> None:
    resources = rendered[name]
    source = rendered[name if name != "prod-gpu-raycronjob" else "prod-gpu"]
    layout = source[("RayJob", "nightly-reindex-template")]["spec"]
    jobs = ray_jobs(resources)
    assert len(jobs) == (2 if name == "index-manifest" else 1)
    for job in jobs:
        assert job["rayClusterSpec"] == layout["rayClusterSpec"]
        assert job["submitterPodTemplate"] == layout["submitterPodTemplate"]
        assert job["backoffLimit"] == 0
        assert kuberay_cleanup_problems(job) == []
        if "deletionStrategy" in job:  # a nightly run: its cluster goes after an hour, itself after 7 days
            assert_nightly_deletion_rules(job["deletionStrategy"])
        else:
            assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] == 3600


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_rayjob_has_an_active_deadline(
    rendered: dict[str, dict[tuple[str, str], Resource]], name: str
) -> None:
    """A stuck job must not hold GPU nodes forever; a nightly one must end before the next night."""
    for job in ray_jobs(rendered[name]):
        deadline = job["activeDeadlineSeconds"]
        nightly = "nightly_reindex.py" in job["entrypoint"]
        assert 0 < deadline < 86400 if nightly else 0 < deadline <= 2 * 86400, job["entrypoint"]


def test_ray_nodes_run_the_project_image_and_submitters_the_small_ray_image(
    overlay: tuple[str, list[Resource]],
) -> None:
    """The submitter only runs `ray job submit`: the Ray release of the cluster's rayVersion, not the
    multi-GB CUDA image of the nodes."""
    project = {"dev-cpu": "registry.example.com/landmark-index:dev"}.get(
        overlay[0], "registry.example.com/landmark-index:0.1.0-cuda13.2"
    )
    for resource in overlay[1]:
        for cluster in cluster_specs(resource):
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                assert [c["image"] for c in group["template"]["spec"]["containers"]] == [project]
    for job in ray_jobs({identity(r): r for r in overlay[1]}):
        (submitter,) = job["submitterPodTemplate"]["spec"]["containers"]
        assert submitter["image"] == f"rayproject/ray:{job['rayClusterSpec']['rayVersion']}-py311-cpu"


def head_resources(cluster: dict[str, Any]) -> dict[str, float]:
    """The head's custom resources: rayStartParams holds a JSON object inside a JSON string literal."""
    quoted = cluster["headGroupSpec"]["rayStartParams"].get("resources", '"{}"')
    return json.loads(json.loads(quoted))


@pytest.mark.parametrize("name", OVERLAYS)
def test_job_drivers_reserve_the_heads_entrypoint_slot(
    rendered: dict[str, dict[tuple[str, str], Resource]], name: str
) -> None:
    """The driver's Ray resources: a slot only the head offers, so it neither lands on a GPU worker (which
    would keep one alive) nor runs unaccounted; its pod resources are the head container's limits."""
    for job in ray_jobs(rendered[name]):
        head = job["rayClusterSpec"]["headGroupSpec"]
        reserved = json.loads(job["entrypointResources"])
        assert reserved == {"entrypoint": 1} == head_resources(job["rayClusterSpec"])
        assert not {"CPU", "GPU", "memory"} & set(reserved)  # Ray refuses built-in resources here
        assert head["rayStartParams"]["num-cpus"] == "0" and "entrypointNumCpus" not in job
        for group in job["rayClusterSpec"]["workerGroupSpecs"]:
            assert "resources" not in group["rayStartParams"]
        (submitter,) = job["submitterPodTemplate"]["spec"]["containers"]
        assert {"cpu", "memory"} <= set(submitter["resources"]["requests"])
        assert {"cpu", "memory"} <= set(submitter["resources"]["limits"])


def test_ray_clusters_use_kuberay_token_auth(overlay: tuple[str, list[Resource]]) -> None:
    """Token auth from KubeRay's generated per-cluster Secret; K8s-delegated auth is unsupported for RayJobs."""
    clusters = [c for r in overlay[1] for c in cluster_specs(r)]
    assert clusters
    for cluster in clusters:
        assert cluster["authOptions"] == {"mode": "token"}
    for resource in overlay[1]:
        for pod in pod_specs(resource):
            for container in pod["containers"]:
                names = {variable["name"] for variable in container.get("env", [])}
                assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & names, "KubeRay sets them; never override"


def test_crd_rejects_an_unknown_auth_mode(
    rendered: dict[str, dict[tuple[str, str], Resource]],
    crd_validators: dict[str, jsonschema.Draft7Validator],
) -> None:
    bad = copy.deepcopy(rendered["raycluster"][("RayCluster", "landmark-index")])
    bad["spec"]["authOptions"]["mode"] = "tokens"
    assert not crd_validators["RayCluster"].is_valid(bad)


DIGEST_PINNED = re.compile(
    r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}"
)  # name:tag@sha256:digest (tag for readers)


def test_every_image_is_pinned_as_documented(overlay: tuple[str, list[Resource]]) -> None:
    """k8s/README.md, "Images": the project image by the overlay's `images:` entry, the submitters' Ray
    image by the exact release of rayVersion, every other image (the CronJob's kubectl) by digest."""
    resources = {identity(r): r for r in overlay[1]}
    ray_versions = {c["rayVersion"] for r in resources.values() for c in cluster_specs(r)}
    allowed_tags = {f"rayproject/ray:{version}-py311-cpu" for version in ray_versions}
    images = {c["image"] for r in resources.values() for pod in pod_specs(r) for c in pod["containers"]}
    project = {image for image in images if image_name(image) == "registry.example.com/landmark-index"}
    assert len(project) == 1 and re.fullmatch(r"[\w./-]+:[\w.-]+", project.pop())
    others = {image for image in images if image_name(image) != "registry.example.com/landmark-index"}
    for image in others - allowed_tags:
        assert DIGEST_PINNED.fullmatch(image), f"{image} is neither digest-pinned nor the Ray release"
    if ("CronJob", "nightly-reindex") in resources:
        (kubectl,) = [
            c["image"]
            for pod in pod_specs(resources[("CronJob", "nightly-reindex")])
            for c in pod["containers"]
        ]
        assert image_name(kubectl) == "alpine/k8s" and DIGEST_PINNED.fullmatch(kubectl)


def test_the_pin_check_refuses_a_tag_only_kubectl_image(
    rendered: dict[str, dict[tuple[str, str], Resource]],
) -> None:
    resources = copy.deepcopy(list(rendered["prod-gpu"].values()))
    for resource in resources:
        for pod in pod_specs(resource):
            for container in pod["containers"]:
                container["image"] = container["image"].split("@")[0]
    with pytest.raises(AssertionError, match=re.escape("alpine/k8s:1.33.4 is neither")):
        test_every_image_is_pinned_as_documented(("prod-gpu", resources))


# ----------------------------------------------------------------------------- nightly scheduling


def test_cronjob_forbids_overlap_with_least_privilege(
    rendered: dict[str, dict[tuple[str, str], Resource]],
) -> None:
    resources = rendered["prod-gpu"]
    cronjob = resources[("CronJob", "nightly-reindex")]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert ("ServiceAccount", account) in resources
    role = resources[("Role", account)]
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}
    ]
    binding = resources[("RoleBinding", account)]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account}
    namespace = cronjob["metadata"]["namespace"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]


def submit_script(resources: dict[tuple[str, str], Resource]) -> str:
    pod = resources[("CronJob", "nightly-reindex")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    return container["args"][0]


def test_submit_script_is_valid_sh_and_refuses_active_runs(
    rendered: dict[str, dict[tuple[str, str], Resource]],
) -> None:
    script = submit_script(rendered["prod-gpu"])
    checked = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    # The awk filter that decides "still active": run it on a listing like the script's kubectl output.
    (awk_program,) = re.findall(r"awk '(NF && [^']*)'", script)
    listing = "a Complete\nb Running\nc\nd Failed\ne Suspended\n"
    active = subprocess.run(["awk", awk_program], input=listing, capture_output=True, text=True, timeout=30)
    assert active.stdout.split("\n")[:-1] == ["b Running", "c", "e Suspended"]


def as_served(resource: Resource) -> Resource:
    """What `kubectl get -o json` returns for an applied resource: server-set fields and a status."""
    served = copy.deepcopy(resource)
    served["metadata"].update(
        uid="0b6c9c1e-0000-4000-8000-000000000000",
        resourceVersion="4711",
        generation=1,
        creationTimestamp="2026-01-01T00:00:00Z",
        annotations={"kubectl.kubernetes.io/last-applied-configuration": json.dumps(resource)},
        managedFields=[{"manager": "kubectl", "operation": "Apply"}],
    )
    served["status"] = {"jobDeploymentStatus": "Suspended"}
    return served


def test_submit_script_creates_an_unsuspended_run_of_the_template(
    rendered: dict[str, dict[tuple[str, str], Resource]], tmp_path: Path
) -> None:
    """Runs the script's own `kubectl patch --local` step on the template as the API server returns it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the submit script's patch step is not executed")
    resources = rendered["prod-gpu"]
    script = submit_script(resources)
    (template_name,) = re.findall(r"kubectl get rayjob (\S+) -o json > /tmp/template.json", script)
    template = resources[("RayJob", template_name)]
    assert template["spec"]["suspend"] is True
    (tmp_path / "template.json").write_text(json.dumps(as_served(template)))
    (patch_step,) = re.findall(
        r"(kubectl patch --local .*?)[\s\\]*\| kubectl create -f -", script, flags=re.DOTALL
    )
    patch_step = patch_step.replace("/tmp/template.json", str(tmp_path / "template.json"))
    patched = subprocess.run(
        ["sh", "-c", f"set -eu\nrun=nightly-reindex-20260101-0200\n{patch_step}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(Path(kubectl).parent), "HOME": str(tmp_path), **submitter_env(resources)},
    )
    assert patched.returncode == 0, patched.stderr
    run = json.loads(patched.stdout)
    labels = {**template["metadata"]["labels"], "landmark-index/role": "run"}
    assert run["metadata"] == {
        "name": "nightly-reindex-20260101-0200",
        "namespace": "landmark-index",
        "labels": labels,
    }
    assert run["spec"] == {**nightly_run_spec(template["spec"], resources), "suspend": False}
    assert "status" not in run
    assert kuberay_cleanup_problems(run["spec"]) == []
    if CRDS.is_dir():  # the schema check needs ../shared; the rest of this test does not
        validator = load_crd_validators()["RayJob"]
        assert validator.is_valid(run) and cel_errors(validator.schema, run) == []
    (selector,) = re.findall(r'runs_selector="([^"]+)"', script)
    assert selects({"labelSelector": selector}, run)
    assert not selects({"labelSelector": selector}, template)  # the template never counts as a run


def test_raycronjob_runs_the_same_nightly_job(rendered: dict[str, dict[tuple[str, str], Resource]]) -> None:
    cron = rendered["prod-gpu-raycronjob"]
    assert not [key for key in cron if key[0] in ("CronJob", "Role", "RoleBinding")]
    assert ("ServiceAccount", "nightly-reindex-submitter") not in cron
    template = rendered["prod-gpu"][("RayJob", "nightly-reindex-template")]["spec"]
    job = cron[("RayCronJob", "nightly-reindex")]["spec"]["jobTemplate"]
    assert nightly_run_spec(template, rendered["prod-gpu"]) == job


def submitter_env(resources: dict[tuple[str, str], Resource]) -> dict[str, str]:
    pod = resources[("CronJob", "nightly-reindex")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return {variable["name"]: variable["value"] for variable in container["env"]}


def nightly_run_spec(template: dict[str, Any], resources: dict[tuple[str, str], Resource]) -> dict[str, Any]:
    """A night's RayJob spec: the template's, unsuspended, with the submitter's deletion rules for cleanup."""
    run = {k: v for k, v in template.items() if k not in ("suspend", "shutdownAfterJobFinishes")}
    del run["ttlSecondsAfterFinished"]
    return {**run, "deletionStrategy": json.loads(submitter_env(resources)["DELETION_STRATEGY"])}


def assert_nightly_deletion_rules(strategy: dict[str, Any], days: int = 7) -> None:
    """Every way a run ends (job succeeded, failed, or its deployment failed) deletes the cluster after an
    hour and the RayJob after ``days`` days."""
    rules = {
        (rule["policy"], *[(k, v) for k, v in rule["condition"].items() if k != "ttlSeconds"]): rule[
            "condition"
        ]["ttlSeconds"]
        for rule in strategy["deletionRules"]
    }
    ends = [("jobStatus", "SUCCEEDED"), ("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed")]
    expected = {("DeleteCluster", end): 3600 for end in ends} | {
        ("DeleteSelf", end): days * 86400 for end in ends
    }
    assert rules == expected


# ----------------------------------------------------------------------------- entrypoints and image


def parse_entrypoint(entrypoint: str) -> tuple[Path, dict[str, str]]:
    """'python /app/jobs/x.py --a "$A" --b 1' -> (repo/jobs/x.py, {'--a': '$A', '--b': '1'})."""
    python, script, *arguments = shlex.split(entrypoint)
    assert python == "python" and len(arguments) % 2 == 0, entrypoint
    workdir = dockerfile_value("WORKDIR")
    assert script.startswith(workdir + "/"), f"{script} is not under the image's WORKDIR {workdir}"
    flags = dict(zip(arguments[::2], arguments[1::2], strict=True))
    assert all(flag.startswith("--") for flag in flags), entrypoint
    return REPO / script.removeprefix(workdir + "/"), flags


def test_entrypoint_variables_come_from_the_configmap(overlay: tuple[str, list[Resource]]) -> None:
    resources = {identity(r): r for r in overlay[1]}
    config = resources[("ConfigMap", "landmark-index-config")]["data"]
    for entrypoint in entrypoints(resources).values():
        for value in parse_entrypoint(entrypoint)[1].values():
            for variable in re.findall(r"\$\{?(\w+)", value):
                assert variable in config, f"${variable} of {entrypoint!r} is not in the ConfigMap"


@pytest.mark.parametrize(
    ("script", "required"),
    [("index_manifest.py", {"--manifest", "--out"}), ("nightly_reindex.py", {"--manifest", "--root"})],
)
def test_entrypoints_exist_and_accept_their_flags(
    rendered: dict[str, dict[tuple[str, str], Resource]], script: str, required: set[str]
) -> None:
    used = [
        parse_entrypoint(e)
        for resources in rendered.values()
        for e in entrypoints(resources).values()
        if parse_entrypoint(e)[0].name == script
    ]
    assert used, f"no manifest runs jobs/{script}"
    path = used[0][0]
    assert path.is_file(), f"{path} does not exist: the manifests' entrypoint has nothing to run"
    shown = subprocess.run(
        [sys.executable, str(path), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},  # rich/typer help must not cut long flag names
    )
    assert shown.returncode == 0, shown.stderr
    for _, flags in used:
        assert required <= set(flags)
        for flag in flags:
            listed = re.search(rf"{re.escape(flag)}(?![\w-])", shown.stdout)
            assert listed, f"{path.name} --help does not list {flag}"


def dockerfile_arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", (REPO / "Dockerfile").read_text(), flags=re.MULTILINE)
    return value


def lock_pins(name: str) -> dict[str, str]:
    """Package → version of requirements/NAME.lock (markers ignored: one version per package)."""
    text = (REPO / "requirements" / f"{name}.lock").read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", text, flags=re.MULTILINE))


def test_image_installs_the_gpu_lock_before_the_code() -> None:
    text = (REPO / "Dockerfile").read_text()
    install = text.index("pip install --no-cache-dir --require-hashes -r requirements/gpu.lock")
    assert text.index("COPY requirements/gpu.lock") < install < text.index("COPY pipeline")
    assert "pip install --no-cache-dir --no-deps ." in text, "the project must not re-resolve dependencies"
    assert "uninstall" not in text
    base = dockerfile_arg("PYTHON_IMAGE")
    assert "cuda" not in base, "the wheels bring CUDA; a CUDA base image duplicates it"
    python = re.search(r"python:(\d+\.\d+)", base)
    locked = re.search(r"--python-version (\d+\.\d+)", (REPO / "scripts" / "lock.sh").read_text())
    assert python and locked and python.group(1) == locked.group(1)


def test_faiss_builds_are_exclusive_and_hopper_capable() -> None:
    gpu, cpu, dev = lock_pins("gpu"), lock_pins("cpu"), lock_pins("dev")
    assert "faiss-cpu" not in gpu and "faiss-gpu-cu12" not in gpu
    assert tuple(int(p) for p in gpu["faiss-gpu"].split(".")[:3]) >= (1, 15, 1)  # first with sm_90
    for pins in (cpu, dev):
        assert "faiss-cpu" in pins and not any(name.startswith("faiss-gpu") for name in pins)


def test_locks_agree_with_each_other_and_the_manifests(
    rendered: dict[str, dict[tuple[str, str], Resource]],
) -> None:
    gpu, cpu, dev = lock_pins("gpu"), lock_pins("cpu"), lock_pins("dev")
    for name, version in cpu.items():
        assert dev.get(name, version) == version and gpu.get(name, version) == version, name
    for resources in rendered.values():
        versions = {c["rayVersion"] for r in resources.values() for c in cluster_specs(r)}
        assert versions == {gpu["ray"]}
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert runtime_env["pip"] == "requirements/cpu.lock"


def test_every_declared_dependency_is_locked() -> None:
    """A dependency added to pyproject.toml without re-running scripts/lock.sh fails here."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    base = project["dependencies"]
    wanted = {
        "cpu": base,
        "gpu": [r for r in base if not r.startswith("faiss-cpu")] + extras["gpu"],  # faiss-gpu replaces it
        "dev": base + extras["dev"] + extras["convert"] + extras["gcs"] + extras["azure"],
    }
    for lock, requirements in wanted.items():
        pins = {name.lower().replace("_", "-") for name in lock_pins(lock)}
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
            assert name in pins, f"{name} is missing from requirements/{lock}.lock: run scripts/lock.sh"


def test_image_user_is_the_manifests_user(rendered: dict[str, dict[tuple[str, str], Resource]]) -> None:
    user = dockerfile_value("USER").split(":")[0]
    cluster = rendered["prod-gpu"][("RayJob", "nightly-reindex-template")]["spec"]["rayClusterSpec"]
    assert int(user) == cluster["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsUser"]
