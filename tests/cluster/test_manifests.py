"""Offline checks of cluster/: what `kubectl apply`, the KubeRay operator, `ray job submit`, Ray Serve and
`ray up` would reject, found before anyone holds a cluster.

- KubeRay manifests against the CRDs' openAPIV3Schema, strictly (an unknown field is an error, as with
  `kubectl apply --validate=strict`; the CRDs themselves would silently prune it), plus the checks the
  operator makes when it admits an object;
- RayJob entrypoints and README commands against upmoe's real argument parsers;
- the RayService's serve application against Ray Serve's config schema and upmoe's ServeOptions;
- runtime envs against Ray's RuntimeEnv, the cluster-launcher YAML against Ray's own schema;
- references between files: volume claims, secrets, images, token wiring, GPU capacity.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import io
import itertools
import json
import os
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
# The shared CRDs sit next to the checkout; a clone elsewhere (CI) still finds them at the workplace path.
_CRD_CANDIDATES = [Path(p) for p in (os.environ.get("UPMOE_KUBERAY_CRDS"),) if p] + [
    REPO.parent / "shared" / "kuberay-crds",
    Path("/work/shared/kuberay-crds"),
]
CRD_DIR = next((p for p in _CRD_CANDIDATES if p.is_dir()), _CRD_CANDIDATES[0])
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
API_VERSION = "ray.io/v1"
SHARED_MOUNT = "/mnt/shared"
# The operator's data key in a token secret named by authOptions.secretName.
AUTH_TOKEN_KEY = "auth_token"
# KubeRay derives other objects' names from these (head service "<name>-head-svc", a RayJob's or
# RayService's cluster "<name>-xxxxx") and Kubernetes names end at 63 characters, so it refuses longer ones.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# What the operator accepts for ray.io/initializing-timeout: whole seconds or a Go duration such as "30m".
GO_DURATION = re.compile(r"[1-9]\d*|((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")
OBJECT_META_USED = {"name", "namespace", "labels", "annotations"}
SERVE_DEPLOYMENTS = {"OpenAIIngress", "ModelServer"}
# The submitter pod runs the entrypoint through `bash -c`, without the shared volume: globs, expansions,
# redirections or a second command would be evaluated there, not by upmoe on the cluster.
SHELL_SYNTAX = re.compile(r"[*?\[\]$`;&|<>(){}\\]")
# GPUs per instance for the launcher's node types (AWS documentation).
AWS_GPUS = {"p5.48xlarge": 8, "p4d.24xlarge": 8, "g5.12xlarge": 4, "g5.48xlarge": 8}

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML: the C parser is 10x faster
Doc = dict[str, Any]


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=Loader) if doc is not None]


def kuberay_manifests() -> list[tuple[str, Doc]]:
    return [
        (path.name, doc)
        for path in sorted(CLUSTER.glob("*.yaml"))
        for doc in load_docs(path)
        if isinstance(doc, dict) and doc.get("kind") in CRD_FILES
    ]


MANIFESTS = kuberay_manifests()
MANIFEST_IDS = [f"{name}:{doc['kind']}/{doc.get('metadata', {}).get('name')}" for name, doc in MANIFESTS]


def of_kind(kind: str) -> list[Doc]:
    return [doc for _, doc in MANIFESTS if doc["kind"] == kind]


def by_kind_and_name(kind: str, name: str) -> Doc:
    (doc,) = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    return doc


# --------------------------------------------------------------------------------------------------
# Strict schema validation
# --------------------------------------------------------------------------------------------------


def _subschemas(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The schemas nested directly in ``node``: property schemas, not property names, which are data."""
    for key in ("properties", "patternProperties"):
        yield from node.get(key, {}).values()
    for key in ("items", "additionalProperties", "not"):
        sub = node.get(key)
        if isinstance(sub, dict):
            yield sub
        elif isinstance(sub, list):
            yield from sub
    for key in ("allOf", "anyOf", "oneOf"):
        yield from node.get(key, [])


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a CRD schema in which unknown fields are errors and the Kubernetes extensions mean what they do
    in the API server.

    Structural CRD schemas prune unknown fields instead of rejecting them, so a misspelled field in a manifest
    is silently dropped by the server; `kubectl --validate=strict` reports it. Only objects that list their
    properties are closed: maps (additionalProperties: schema) and objects marked
    x-kubernetes-preserve-unknown-fields keep accepting any key.
    """
    out = copy.deepcopy(schema)
    stack = [out]
    while stack:
        node = stack.pop()
        if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("nullable") is True and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        stack.extend(_subschemas(node))
    return out


# jsonschema ignores unknown formats; the API server rejects int32 fields beyond 32 bits.
FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _is_int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _is_int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of the served CRD version that this repo's apiVersion names."""
    path = CRD_DIR / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (set UPMOE_KUBERAY_CRDS)")
    crd = yaml.load(path.read_text(), Loader=Loader)
    group, version = API_VERSION.split("/")
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == group, path
    assert crd["spec"]["names"]["kind"] == kind, path
    versions = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert len(versions) == 1, f"{path}: no single version named {version}"
    assert versions[0]["served"], f"{path}: {version} is not served; the API server would refuse {API_VERSION}"
    return versions[0]["schema"]["openAPIV3Schema"]


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    # OpenAPI 3.0 schemas are a dialect of draft 4 (boolean exclusiveMinimum, no const).
    return jsonschema.Draft4Validator(strict_schema(crd_schema(kind)), format_checker=FORMATS)


def schema_errors(doc: Doc) -> list[str]:
    """Everything `kubectl apply --validate=strict` would refuse in ``doc``, one line per problem."""
    errors: list[str] = []
    if doc.get("apiVersion") != API_VERSION:
        errors.append(f"$.apiVersion: {doc.get('apiVersion')!r}, expected {API_VERSION!r}")
    kind = doc.get("kind")
    if kind not in CRD_FILES:
        return [*errors, f"$.kind: {kind!r} is not one of {sorted(CRD_FILES)}"]
    # The CRDs declare metadata as a bare object (the API server checks ObjectMeta itself): check what we use.
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        errors.append("$.metadata: missing")
    else:
        errors += [
            f"$.metadata.{key}: not an ObjectMeta field used here" for key in sorted(set(meta) - OBJECT_META_USED)
        ]
        name = meta.get("name")
        if not isinstance(name, str) or not DNS_1035.fullmatch(name):
            errors.append(f"$.metadata.name: {name!r} is not a DNS-1035 label (lower case, digits, '-')")
        elif len(name) > MAX_NAME[kind]:
            errors.append(f"$.metadata.name: {name!r} is longer than KubeRay's {MAX_NAME[kind]} for a {kind}")
        for field in ("labels", "annotations"):
            values = meta.get(field, {})
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                errors.append(f"$.metadata.{field}: must map strings to strings")
    for error in sorted(crd_validator(kind).iter_errors(doc), key=lambda e: e.json_path):
        errors.append(f"{error.json_path}: {error.message}")
    return errors


def cel_rules_in_use(schema: dict[str, Any], instance: Any, path: str = "$") -> list[tuple[str, str]]:
    """The x-kubernetes-validations (CEL) rules on the fields ``instance`` actually sets: jsonschema cannot run them."""
    found = [(path, rule["rule"]) for rule in schema.get("x-kubernetes-validations", [])]
    if isinstance(instance, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, value in instance.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                found += cel_rules_in_use(sub, value, f"{path}.{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            found += cel_rules_in_use(schema["items"], item, f"{path}[{i}]")
    return found


# --------------------------------------------------------------------------------------------------
# What the KubeRay operator refuses beyond the schema (ray-operator/controllers/ray/utils/validation.go)
# --------------------------------------------------------------------------------------------------


def cluster_specs(doc: Doc) -> list[tuple[str, Doc]]:
    """The Ray cluster specs a manifest defines, with where they are."""
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [("$.spec", spec)]
    if doc["kind"] == "RayJob":
        return [("$.spec.rayClusterSpec", spec["rayClusterSpec"])] if "rayClusterSpec" in spec else []
    return [("$.spec.rayClusterConfig", spec["rayClusterConfig"])]


def groups(cluster: Doc) -> list[tuple[str, Doc]]:
    head = [("headGroupSpec", cluster["headGroupSpec"])]
    return head + [(f"workerGroupSpecs[{g['groupName']}]", g) for g in cluster.get("workerGroupSpecs", [])]


def ray_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def cluster_spec_errors(where: str, cluster: Doc) -> list[str]:
    errors: list[str] = []
    for name, group in groups(cluster):
        params = group.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            errors.append(f"{where}.{name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{where}.{name}: rayStartParams.labels is refused; use the group's labels field")
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{where}.{name}: no containers")
    workers = cluster.get("workerGroupSpecs", [])
    names = [g["groupName"] for g in workers]
    if len(set(names)) != len(names):
        errors.append(f"{where}.workerGroupSpecs: duplicate groupName in {names}")
    for g in workers:
        if not g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]:
            errors.append(f"{where}.workerGroupSpecs[{g['groupName']}]: need minReplicas <= replicas <= maxReplicas")
    if cluster.get("authOptions", {}).get("mode") == "token":
        version = cluster.get("rayVersion", "")
        if not re.fullmatch(r"\d+\.\d+\.\d+", version) or ray_version(version) < (2, 52, 0):
            errors.append(f"{where}.rayVersion: token auth needs Ray >= 2.52.0, got {version!r}")
    if cluster.get("enableInTreeAutoscaling") and cluster.get("autoscalerOptions", {}).get("version") == "v2":
        for name, group in groups(cluster):
            if group["template"]["spec"].get("restartPolicy", "Never") != "Never":
                errors.append(f"{where}.{name}: autoscaler v2 needs restartPolicy Never or unset")
    return errors


def operator_errors(doc: Doc) -> list[str]:
    errors = [e for where, cluster in cluster_specs(doc) for e in cluster_spec_errors(where, cluster)]
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append("$.spec: ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes: true")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("$.spec: a suspended RayJob needs shutdownAfterJobFinishes: true")
        selector = spec.get("clusterSelector")
        if selector and not selector.get("ray.io/cluster"):
            errors.append("$.spec.clusterSelector: needs a non-empty 'ray.io/cluster'")
        if not selector and "rayClusterSpec" not in spec:
            errors.append("$.spec: one of rayClusterSpec or clusterSelector must be set")
        if spec.get("activeDeadlineSeconds", 1) <= 0 or spec.get("backoffLimit", 0) < 0:
            errors.append("$.spec: activeDeadlineSeconds must be positive and backoffLimit >= 0")
        try:
            yaml.safe_load(spec.get("runtimeEnvYAML", ""))
        except yaml.YAMLError as e:
            errors.append(f"$.spec.runtimeEnvYAML: not YAML ({e})")
    if doc["kind"] == "RayService":
        if spec["rayClusterConfig"]["headGroupSpec"].get("headService", {}).get("name"):
            errors.append("$.spec.rayClusterConfig.headGroupSpec.headService: the operator names it; do not")
        timeout = doc["metadata"].get("annotations", {}).get("ray.io/initializing-timeout")
        if timeout is not None and not GO_DURATION.fullmatch(timeout):
            errors.append(f"$.metadata.annotations: ray.io/initializing-timeout {timeout!r} is no positive duration")
    return errors


# --------------------------------------------------------------------------------------------------
# upmoe commands
# --------------------------------------------------------------------------------------------------


def parse_upmoe(argv: list[str]) -> tuple[str, argparse.Namespace | None, str]:
    """(subcommand, parsed args or None, problem): parsed with the subcommand's real parser."""
    from upmoe.cli import COMMANDS, build_parser

    if not argv or argv[0] != "upmoe":
        return "", None, f"does not start with 'upmoe': {shlex.join(argv)}"
    if len(argv) < 2 or argv[1] not in COMMANDS:
        return "", None, f"unknown upmoe subcommand in {shlex.join(argv)}; known: {', '.join(COMMANDS)}"
    _, parser = build_parser(argv[1])
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv[2:])
    except SystemExit:  # argparse's way of reporting a bad flag: keep its message for the failure
        return argv[1], None, f"`upmoe {argv[1]}` refuses {shlex.join(argv[2:])}: {stderr.getvalue().strip()}"
    # argparse also accepts any unambiguous prefix (--worker for --workers); a manifest should not depend on
    # a prefix that the next new option can make ambiguous. No public API lists a parser's option strings.
    # `upmoe submit` passes everything after its COMMAND on untouched: that part is the inner command's.
    own = argv[2:]
    if argv[1] == "submit":
        own = list(itertools.takewhile(lambda word: word not in COMMANDS, own))
    known = set(parser._option_string_actions)
    abbreviated = [w.split("=")[0] for w in own if w.startswith("--") and w.split("=")[0] not in known]
    if abbreviated:
        return argv[1], None, f"`upmoe {argv[1]}` options abbreviated: {abbreviated}; spell them out"
    return argv[1], args, ""


def option_value_problem(sub: str, args: argparse.Namespace) -> str:
    """Value checks that need no files: the same config validation `upmoe train` runs before it starts Ray."""
    if sub != "train" or args.config is not None:
        return ""
    from moe_train.config import TrainConfig, load_train_config

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        load_train_config(None, {k: v for k, v in vars(args).items() if k in known}, preset=args.preset)
    except ValueError as e:
        return f"`upmoe train` options are invalid: {e}"
    return ""


def cluster_paths(args: argparse.Namespace) -> list[str]:
    """The files and directories the job names: options parsed as Path, and absolute paths in string options
    (comma lists split). A relative path would resolve against the job's working directory on one node."""
    paths: list[str] = []
    for value in vars(args).values():
        if isinstance(value, Path):
            paths.append(str(value))
        elif isinstance(value, str):
            paths += [p for p in value.split(",") if p.startswith("/")]
    return paths


def entrypoint_problems(entrypoint: str) -> list[str]:
    problems = []
    if SHELL_SYNTAX.search(entrypoint):
        problems.append(f"shell syntax in the entrypoint (the submitter's bash would expand it): {entrypoint!r}")
    sub, args, problem = parse_upmoe(shlex.split(entrypoint))
    if problem:
        return [*problems, problem]
    assert args is not None
    if problem := option_value_problem(sub, args):
        problems.append(problem)
    problems += [
        f"{p} is not under {SHARED_MOUNT}, the only path every node sees"
        for p in cluster_paths(args)
        if not p.startswith(SHARED_MOUNT + "/")
    ]
    return problems


# --------------------------------------------------------------------------------------------------
# Small readers
# --------------------------------------------------------------------------------------------------


def walk(obj: Any) -> Iterator[Any]:
    yield obj
    if isinstance(obj, dict):
        for value in obj.values():
            yield from walk(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from walk(value)


def secret_refs(obj: Any) -> set[tuple[str, str]]:
    return {
        (n["secretKeyRef"]["name"], n["secretKeyRef"]["key"])
        for n in walk(obj)
        if isinstance(n, dict) and "secretKeyRef" in n
    }


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def ray_containers(cluster: Doc) -> list[tuple[str, Doc, Doc]]:
    """(group, container, pod spec) for the Ray container (index 0, as KubeRay assumes) of every group."""
    return [(name, g["template"]["spec"]["containers"][0], g["template"]["spec"]) for name, g in groups(cluster)]


def quantity(value: int | str) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def max_gpus(cluster: Doc) -> tuple[int, int]:
    """(GPUs in the cluster at full scale, GPUs of its largest pod)."""
    total = largest = 0
    for g in cluster.get("workerGroupSpecs", []):
        gpus = int(quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)))
        total += gpus * g["maxReplicas"] * g.get("numOfHosts", 1)
        largest = max(largest, gpus)
    return total, largest


def selected_cluster(job: Doc) -> Doc:
    spec = job["spec"]
    if "rayClusterSpec" in spec:
        return spec["rayClusterSpec"]
    return by_kind_and_name("RayCluster", spec["clusterSelector"]["ray.io/cluster"])["spec"]


def serve_configs() -> list[tuple[str, Doc]]:
    return [(svc["metadata"]["name"], yaml.safe_load(svc["spec"]["serveConfigV2"])) for svc in of_kind("RayService")]


def top_level_functions(module: str) -> set[str]:
    """Functions a module defines, read from its source: importing serve.app would pull in Ray Serve and torch."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"no module {module}"
    tree = ast.parse(Path(spec.origin).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def readme() -> str:
    return (CLUSTER / "README.md").read_text()


def readme_commands() -> list[list[str]]:
    """Every command line in the README's bash blocks, split like a shell would (continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if argv := shlex.split(line, comments=True):
                commands.append(argv)
    return commands


def upmoe_invocations(argv: list[str]) -> list[list[str]]:
    """The upmoe command lines inside ``argv``: itself, what follows `ray job submit ... --`, and the job that
    `upmoe submit [its options] SUBCOMMAND ...` sends."""
    if "--" in argv and argv[argv.index("--") + 1 : argv.index("--") + 2] == ["upmoe"]:
        return [argv[argv.index("--") + 1 :]]
    if argv[:1] != ["upmoe"]:
        return []
    if argv[1:2] == ["submit"]:
        from upmoe.cli import COMMANDS

        inner = [i for i, word in enumerate(argv) if i > 1 and word in COMMANDS]
        return [["upmoe", *argv[inner[0] :]]] if inner else [argv]
    return [argv]


def runtime_envs() -> list[tuple[str, Doc]]:
    envs = [("runtime-env.yaml", yaml.safe_load((CLUSTER / "runtime-env.yaml").read_text()))]
    envs += [
        (f"{job['metadata']['name']}.runtimeEnvYAML", yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
        for job in of_kind("RayJob")
        if "runtimeEnvYAML" in job["spec"]
    ]
    envs += [
        (f"{name}:{app['name']}.runtime_env", app["runtime_env"])
        for name, cfg in serve_configs()
        for app in cfg["applications"]
        if "runtime_env" in app
    ]
    return envs


def launcher() -> Doc:
    return yaml.safe_load((CLUSTER / "cluster-launcher-aws.yaml").read_text())


# --------------------------------------------------------------------------------------------------
# Tests: schema and operator
# --------------------------------------------------------------------------------------------------


def test_every_kuberay_kind_is_present() -> None:
    assert {doc["kind"] for _, doc in MANIFESTS} == set(CRD_FILES)


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=MANIFEST_IDS)
def test_manifest_matches_crd_schema_strictly(name: str, doc: Doc) -> None:
    errors = schema_errors(doc)
    assert not errors, f"{name}:\n" + "\n".join(errors)


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=MANIFEST_IDS)
def test_manifest_passes_operator_checks(name: str, doc: Doc) -> None:
    errors = operator_errors(doc)
    assert not errors, f"{name}:\n" + "\n".join(errors)


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=MANIFEST_IDS)
def test_manifest_sets_no_field_with_an_unchecked_cel_rule(name: str, doc: Doc) -> None:
    # Rules over oldSelf (immutability) only apply to updates. Any other rule on a field we set would be
    # enforced by the API server but not by this test: check it by hand and add it to operator_errors.
    rules = [(path, rule) for path, rule in cel_rules_in_use(crd_schema(doc["kind"]), doc) if "oldSelf" not in rule]
    assert not rules, f"{name}: CEL rules this test cannot evaluate: {rules}"


def _misspelled_field(doc: Doc) -> None:
    doc["spec"]["workerGroupSpec"] = doc["spec"].pop("workerGroupSpecs")


def _replicas_as_word(doc: Doc) -> None:
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"


def _unknown_container_key(doc: Doc) -> None:
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"


def _unknown_key_in_secret_ref(doc: Doc) -> None:
    env = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if "valueFrom" in e)["valueFrom"]["secretKeyRef"]["optinal"] = True


def _gpu_count_as_word(doc: Doc) -> None:
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = (
        "eight"
    )


def _missing_group_name(doc: Doc) -> None:
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]


def _unknown_auth_mode(doc: Doc) -> None:
    doc["spec"]["authOptions"]["mode"] = "password"


def _int32_overflow(doc: Doc) -> None:
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 2**31


def _volume_mount_as_mapping(doc: Doc) -> None:
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["volumeMounts"] = {"shared": SHARED_MOUNT}


def _bad_name(doc: Doc) -> None:
    doc["metadata"]["name"] = "Upmoe_Cluster"


def _old_api_version(doc: Doc) -> None:
    doc["apiVersion"] = "ray.io/v1alpha2"


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        pytest.param(_misspelled_field, "'workerGroupSpec' was unexpected", id="misspelled-spec-field"),
        pytest.param(_replicas_as_word, "$.spec.workerGroupSpecs[0].replicas: 'two' is not of type", id="wrong-type"),
        pytest.param(_unknown_container_key, "'imagePullPolice' was unexpected", id="unknown-key-in-pod-template"),
        pytest.param(_unknown_key_in_secret_ref, "'optinal' was unexpected", id="unknown-key-in-env-source"),
        pytest.param(_gpu_count_as_word, "'eight'", id="not-a-quantity"),
        pytest.param(_missing_group_name, "'groupName' is a required property", id="missing-required"),
        pytest.param(_unknown_auth_mode, "'password' is not one of", id="outside-enum"),
        pytest.param(_int32_overflow, "is not a 'int32'", id="int32-overflow"),
        pytest.param(_volume_mount_as_mapping, "volumeMounts: {'shared'", id="map-for-list"),
        pytest.param(_bad_name, "not a DNS-1035 label", id="bad-name"),
        pytest.param(_old_api_version, "$.apiVersion", id="wrong-api-version"),
    ],
)
def test_broken_raycluster_fails_validation(breakage: Callable[[Doc], None], expected: str) -> None:
    doc = copy.deepcopy(of_kind("RayCluster")[0])
    breakage(doc)
    errors = schema_errors(doc)
    assert any(expected in e for e in errors), f"expected an error containing {expected!r}, got {errors}"


def test_broken_rayjob_and_rayservice_fail_validation() -> None:
    job = copy.deepcopy(of_kind("RayJob")[0])
    job["spec"]["entrypoint"] = shlex.split(job["spec"]["entrypoint"])  # a list where the CRD wants a string
    assert any("$.spec.entrypoint" in e for e in schema_errors(job))
    service = copy.deepcopy(of_kind("RayService")[0])
    service["spec"]["serveConfigV2"] = yaml.safe_load(service["spec"]["serveConfigV2"])  # a mapping, not a string
    assert any("$.spec.serveConfigV2" in e for e in schema_errors(service))
    service["spec"]["rayClusterSpec"] = service["spec"].pop("rayClusterConfig")  # RayJob's name for it
    assert any("'rayClusterSpec' was unexpected" in e for e in schema_errors(service))


def test_broken_rayjob_fails_operator_checks() -> None:
    job = copy.deepcopy(by_kind_and_name("RayJob", "upmoe-train-qwen2-57b-cpt"))
    job["spec"]["ttlSecondsAfterFinished"] = 600
    job["spec"]["clusterSelector"] = {"app": "upmoe"}
    errors = operator_errors(job)
    assert any("shutdownAfterJobFinishes" in e for e in errors) and any("ray.io/cluster" in e for e in errors)


def test_strict_schema_keeps_kubernetes_extensions() -> None:
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
                "open": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}},
                    "x-kubernetes-preserve-unknown-fields": True,
                },
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
                "quantity": {"x-kubernetes-int-or-string": True},
                "maybe": {"type": "string", "nullable": True},
            },
        }
    )
    validator = jsonschema.Draft4Validator(schema)
    assert validator.is_valid({"open": {"b": 1}, "map": {"any": "x"}, "quantity": 8, "maybe": None})
    assert validator.is_valid({"quantity": "8Gi"})
    assert not validator.is_valid({"closed": {"b": "x"}})
    assert not validator.is_valid({"quantity": [8]})
    assert not validator.is_valid({"unknown": 1})


# --------------------------------------------------------------------------------------------------
# Tests: jobs and commands
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("job", of_kind("RayJob"), ids=lambda job: job["metadata"]["name"])
def test_rayjob_entrypoint_is_a_valid_upmoe_command(job: Doc) -> None:
    problems = entrypoint_problems(job["spec"]["entrypoint"])
    assert not problems, f"{job['metadata']['name']}:\n" + "\n".join(problems)


def test_broken_entrypoints_are_caught() -> None:
    def joined(entrypoint: str) -> str:
        return "\n".join(entrypoint_problems(entrypoint))

    assert "unrecognized arguments: --nodes" in joined("upmoe train --model /mnt/shared/m --nodes 2")
    assert "abbreviated: ['--worker']" in joined("upmoe train --model /mnt/shared/m --worker 16")
    assert "invalid int value: 'sixteen'" in joined("upmoe train --model /mnt/shared/m --workers sixteen")
    assert "invalid choice" in joined("upmoe upcycle /mnt/shared/a /mnt/shared/b --init qwen3")
    assert "unknown upmoe subcommand" in joined("upmoe trian --model /mnt/shared/m")
    assert "does not start with 'upmoe'" in joined("python -m upmoe train")
    assert "must divide --workers" in joined(
        "upmoe train --model /mnt/shared/m --data x --out /mnt/shared/r --workers 6 --ep 4"
    )
    assert "not under /mnt/shared" in joined("upmoe train --model /home/me/m --data /mnt/shared/d --out /mnt/shared/r")
    assert "Qwen2-7B is not under" in joined("upmoe upcycle Qwen2-7B /mnt/shared/models/moe")
    assert "shell syntax" in joined(
        "upmoe train --model /mnt/shared/m --data /mnt/shared/d/*.jsonl --out /mnt/shared/r"
    )


@pytest.mark.parametrize("job", of_kind("RayJob"), ids=lambda job: job["metadata"]["name"])
def test_rayjob_cluster_can_hold_the_job(job: Doc) -> None:
    sub, args, problem = parse_upmoe(shlex.split(job["spec"]["entrypoint"]))
    assert args is not None, problem
    cluster = selected_cluster(job)
    if sub == "train":
        total, per_pod = max_gpus(cluster)
        need = args.workers * (args.gpus_per_worker or 0)
        assert need <= total, f"{need} GPUs wanted, the cluster scales to {total}"
        # An EP group inside one pod keeps the all-to-all on NVLink; across pods it crosses the network.
        assert args.ep * (args.gpus_per_worker or 0) <= per_pod, f"--ep {args.ep} spans more than one pod"
    if sub == "upcycle" and args.max_parallel:
        cpus = sum(
            quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) * g["maxReplicas"]
            for g in cluster.get("workerGroupSpecs", [])
        )
        assert args.max_parallel <= cpus, f"--max-parallel {args.max_parallel} tasks of 1 CPU, {cpus} worker CPUs"


def test_readme_upmoe_commands_parse() -> None:
    invocations = [inv for argv in readme_commands() for inv in upmoe_invocations(argv)]
    subcommands = {inv[1] for inv in invocations if len(inv) > 1}
    assert {"upcycle", "train", "export"} <= subcommands, subcommands
    problems = []
    for inv in invocations:
        if inv[1:2] == ["submit"]:
            continue  # a submit line without an inner subcommand: covered by the next test
        sub, args, problem = parse_upmoe(inv)
        if args is not None:
            outside = [p for p in cluster_paths(args) if not p.startswith(SHARED_MOUNT + "/")]
            problem = option_value_problem(sub, args) or (f"not under {SHARED_MOUNT}: {outside}" if outside else "")
        if problem:
            problems.append(f"{shlex.join(inv)}\n  {problem}")
    assert not problems, "\n".join(problems)


def test_readme_submit_commands_parse_with_submit() -> None:
    if importlib.util.find_spec("upmoe.jobs") is None:
        pytest.skip("upmoe.jobs (upmoe submit) is not in this checkout yet")
    submits = [argv for argv in readme_commands() if argv[:2] == ["upmoe", "submit"]]
    assert submits
    problems = [problem for argv in submits if (problem := parse_upmoe(argv)[2])]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# Tests: serving
# --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic v1-style fields
@pytest.mark.parametrize(("name", "config"), serve_configs(), ids=[name for name, _ in serve_configs()])
def test_serve_config_matches_ray_serve_schema(name: str, config: Doc) -> None:
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    # Ray's schema ignores unknown keys rather than refusing them: a misspelled option would vanish.
    unknown = set(config) - set(ServeDeploySchema.model_fields)
    unknown |= set(config.get("http_options", {})) - set(HTTPOptionsSchema.model_fields)
    for app in config["applications"]:
        unknown |= set(app) - set(ServeApplicationSchema.model_fields)
    assert not unknown, f"{name}: keys Ray Serve would ignore: {sorted(unknown)}"


@pytest.mark.parametrize(("name", "config"), serve_configs(), ids=[name for name, _ in serve_configs()])
def test_serve_application_args_are_serve_options(name: str, config: Doc) -> None:
    from serve.options import ServeOptions, load_serve_options

    for app in config["applications"]:
        assert app["import_path"] == "serve.app:build_app"
        assert "build_app" in top_level_functions("serve.app"), "serve/app.py defines no build_app"
        # The OpenAI routes (/v1/...) are absolute: clients expect them at the root of the endpoint.
        assert app.get("route_prefix", "/") == "/"
        # Prefer none: build_app derives each deployment's options (autoscaling, GPUs per rank) from args,
        # and overrides here silently win over them. Any that exist must name the app's own deployments.
        overridden = {d.get("name") for d in app.get("deployments", [])}
        assert overridden <= SERVE_DEPLOYMENTS, f"{name}: no such deployments: {overridden - SERVE_DEPLOYMENTS}"
        args = app["args"]
        unknown = set(args) - {f.name for f in dataclasses.fields(ServeOptions)}
        assert not unknown, f"{name}: not serve options: {sorted(unknown)}"
        # The key must come from a secret ($UPMOE_API_KEY), and in-cluster code connects to its own cluster.
        assert "api_key" not in args and "ray_address" not in args
        options = load_serve_options(None, args)
        assert options.model_dir.startswith(SHARED_MOUNT + "/")
        http = config.get("http_options", {})
        for key in ("host", "port"):
            if key in args and key in http:
                assert args[key] == http[key], f"{name}: args.{key} disagrees with http_options.{key}"


def test_rayservice_cluster_holds_its_replicas() -> None:
    from serve.options import load_serve_options

    for service in of_kind("RayService"):
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
        total, per_pod = max_gpus(service["spec"]["rayClusterConfig"])
        for app in config["applications"]:
            options = load_serve_options(None, app["args"])
            gang = options.ep * options.gpus_per_rank
            assert gang <= per_pod, f"a replica needs {gang} GPUs, the largest pod has {per_pod}"
            assert options.max_replicas * gang <= total, f"{options.max_replicas} replicas x {gang} GPUs > {total}"


# --------------------------------------------------------------------------------------------------
# Tests: references between files
# --------------------------------------------------------------------------------------------------


def test_every_claim_is_defined_and_shared() -> None:
    claims = {
        doc["metadata"]["name"]: doc
        for doc in load_docs(CLUSTER / "shared-storage.yaml")
        if doc.get("kind") == "PersistentVolumeClaim"
    }
    for claim in claims.values():
        assert claim["apiVersion"] == "v1" and "ReadWriteMany" in claim["spec"]["accessModes"], claim
    used = {
        n["persistentVolumeClaim"]["claimName"]
        for _, doc in MANIFESTS
        for n in walk(doc)
        if isinstance(n, dict) and "persistentVolumeClaim" in n
    }
    assert used and used <= set(claims), f"claims used but not defined: {used - set(claims)}"


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=MANIFEST_IDS)
def test_every_ray_container_mounts_the_shared_volume(name: str, doc: Doc) -> None:
    for where, cluster in cluster_specs(doc):
        for group, container, pod in ray_containers(cluster):
            claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
            mounts = {m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in claims}
            assert SHARED_MOUNT in mounts, f"{name} {where}.{group}: {SHARED_MOUNT} not mounted from a claim"


def test_every_secret_is_created_in_the_readme() -> None:
    created = set(re.findall(r"kubectl create secret generic (\S+) --from-literal=([^=\s]+)=", readme()))
    used = {ref for _, doc in MANIFESTS for ref in secret_refs(doc)}
    used |= {
        (c["authOptions"]["secretName"], AUTH_TOKEN_KEY)
        for _, doc in MANIFESTS
        for _, c in cluster_specs(doc)
        if "secretName" in c.get("authOptions", {})
    }
    assert used <= created, f"secrets the manifests read but the README never creates: {sorted(used - created)}"


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=MANIFEST_IDS)
def test_token_auth_reaches_every_ray_process_and_submitter(name: str, doc: Doc) -> None:
    # A node without the token cannot join and a submitter without it gets 401 from the job API; the
    # operator's own dashboard client only has it through authOptions.secretName.
    def check(where: str, container: Doc, secret: str) -> None:
        env = env_of(container)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name} {where}: RAY_AUTH_MODE"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert (ref.get("name"), ref.get("key")) == (secret, AUTH_TOKEN_KEY), f"{name} {where}: RAY_AUTH_TOKEN"

    clusters = cluster_specs(doc)
    if doc["kind"] == "RayJob":
        clusters = clusters or [("clusterSelector", selected_cluster(doc))]
    for where, cluster in clusters:
        auth = cluster.get("authOptions", {})
        assert auth.get("mode") == "token" and auth.get("secretName"), f"{name} {where}: authOptions"
        for group, container, _ in ray_containers(cluster):
            check(f"{where}.{group}", container, auth["secretName"])
        if doc["kind"] == "RayJob":
            check(
                "submitterPodTemplate", doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0], auth["secretName"]
            )


def test_one_image_and_one_ray_version_everywhere() -> None:
    images = {n["image"] for _, doc in MANIFESTS for n in walk(doc) if isinstance(n, dict) and "image" in n}
    versions = {c["rayVersion"] for _, doc in MANIFESTS for _, c in cluster_specs(doc)}
    assert len(images) == 1, f"mixed images: {images}"
    assert len(versions) == 1, f"mixed Ray versions: {versions}"


def test_cluster_selector_names_a_raycluster_here() -> None:
    names = {doc["metadata"]["name"] for doc in of_kind("RayCluster")}
    for job in of_kind("RayJob"):
        if "clusterSelector" in job["spec"]:
            assert job["spec"]["clusterSelector"]["ray.io/cluster"] in names


# --------------------------------------------------------------------------------------------------
# Tests: runtime envs and the cluster launcher
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "env"), runtime_envs(), ids=[name for name, _ in runtime_envs()])
def test_runtime_env_is_valid_for_ray(name: str, env: Doc) -> None:
    from ray.runtime_env import RuntimeEnv

    # RuntimeEnv keeps unknown keys with only a warning (plugins may claim them); none are used here.
    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"{name}: unknown runtime_env keys {sorted(unknown)}"
    RuntimeEnv(**env)  # type checks of every value; builds the env locally, uploads nothing


def test_launcher_matches_ray_cluster_schema() -> None:
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin is not None
    schema = json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(launcher())]
    assert not errors, "\n".join(errors)
    broken = launcher()
    broken["head_start_commands"] = broken.pop("head_start_ray_commands")
    assert not validator.is_valid(broken), "Ray's schema should refuse a misspelled top-level key"


def test_launcher_node_types_and_token_setup() -> None:
    config = launcher()
    required = {
        "cluster_name",
        "max_workers",
        "provider",
        "auth",
        "available_node_types",
        "head_node_type",
        "file_mounts",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    }
    assert required <= set(config), f"missing: {sorted(required - set(config))}"
    assert config["provider"]["type"] == "aws" and config["provider"].get("region")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node in types.items():
        if name == config["head_node_type"]:
            continue
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"] <= config["max_workers"], name
        instance = node["node_config"]["InstanceType"]
        assert node["resources"].get("GPU", 0) == AWS_GPUS.get(instance, 0), f"{name}: GPUs of {instance}"
    # The head advertises no CPUs in both places the launcher reads: its node type and `ray start`.
    head_start = " ".join(config["head_start_ray_commands"])
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0 and "--num-cpus=0" in head_start
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in cmd and "ray start" in cmd for cmd in config[key]), key
    # Ray reads ~/.ray/auth_token when no RAY_AUTH_TOKEN is set: every node needs the file.
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("pip install" in cmd and "~/upmoe" in cmd for cmd in config["setup_commands"])
