"""deploy/: every manifest parses and says what deploy/README.md promises. Fast, offline, no cluster, no Docker.

- every YAML file under deploy/ parses;
- the `ray up` files pass Ray's own cluster-config validation (``prepare_config`` merges the provider's
  defaults exactly as `ray up` does, ``validate_config`` checks the result against ray/autoscaler/ray-schema.json;
  neither contacts a cloud);
- the KubeRay RayCluster / RayJobs carry the fields KubeRay needs (ray.io/v1, a head with rayStartParams and an
  image, GPU worker groups with autoscaling bounds and nvidia.com/gpu limits), token auth from a Secret on every
  Ray container, and nothing exposes the dashboard outside the cluster;
- the RayJob entrypoints are real `repurpose` command lines (parsed by the CLI's own parser) whose grid is mounted;
- the Dockerfile installs the project and its entry command is a console script whose target imports.
"""
from __future__ import annotations

import copy
import glob
import importlib
import json
import os
import posixpath
import re
import shlex
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(REPO, "deploy")
LAUNCHERS = {"aws": os.path.join(DEPLOY, "launcher", "aws.yaml"), "gcp": os.path.join(DEPLOY, "launcher", "gcp.yaml")}
DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
AUTH_SECRET_KEY = "auth_token"  # the data key KubeRay's authOptions.secretName expects (KubeRay API reference)
GPU = "nvidia.com/gpu"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}  # KubeRay JobSubmissionMode

# Field names of the ray.io/v1 types we write, from KubeRay's generated API reference (docs/reference/api.md,
# v1.7.0). The CRDs are structural: an unknown (misspelt) field is pruned or rejected, never used.
KUBERAY_FIELDS = {
    "RayClusterSpec": {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                       "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                       "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
                       "workerGroupSpecs"},
    "HeadGroupSpec": {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                      "rayStartParams", "serviceType"},
    "WorkerGroupSpec": {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                        "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy",
                        "numOfHosts"},
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                   "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                   "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                   "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
                   "shutdownAfterJobFinishes", "suspend"},
    "AuthOptions": {"enableK8sTokenAuth", "secretName", "mode"},
    "AutoscalerOptions": {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                          "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args"},
}


# --- loading -------------------------------------------------------------------------------------------------
def yaml_files() -> list[str]:
    paths = glob.glob(os.path.join(DEPLOY, "**", "*.yaml"), recursive=True)
    return sorted(paths + glob.glob(os.path.join(DEPLOY, "**", "*.yml"), recursive=True))


def load_docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def all_docs() -> list[tuple[str, dict]]:
    return [(os.path.relpath(p, REPO), d) for p in yaml_files() for d in load_docs(p)]


def kuberay(kind: str) -> list[dict]:
    return [d for _, d in all_docs() if d.get("apiVersion", "").startswith("ray.io/") and d.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of the RayCluster and of every RayJob's embedded cluster."""
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in kuberay("RayCluster")]
    return specs + [(f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in kuberay("RayJob")]


def ray_groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first one


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def image_tag_suffix() -> str:
    return f"/repurpose:{pyproject()['project']['version']}"


def load_launcher(cloud: str) -> dict:
    (doc,) = load_docs(LAUNCHERS[cloud])
    return doc


def find_job(command: str) -> dict:
    """The RayJob whose entrypoint is `repurpose <command> ...`."""
    jobs = [j for j in kuberay("RayJob") if shlex.split(j["spec"]["entrypoint"])[:2] == ["repurpose", command]]
    assert len(jobs) == 1, f"expected one RayJob running `repurpose {command}`, found {len(jobs)}"
    return jobs[0]


def parse_entrypoint(entrypoint: str):
    """The entrypoint through the CLI's own parser: a typo'd command or flag fails here, not on the cluster."""
    from orchestrator.cli import build_parser

    try:
        return build_parser().parse_args(shlex.split(entrypoint)[1:])
    except SystemExit:
        pytest.fail(f"`{entrypoint}` is not a valid repurpose command line")


# --- every file parses -----------------------------------------------------------------------------------------
def test_the_manifests_are_there():
    names = {os.path.relpath(p, DEPLOY) for p in yaml_files()}
    assert {"launcher/aws.yaml", "launcher/gcp.yaml", "kuberay/raycluster.yaml"} <= names
    assert len(kuberay("RayCluster")) == 1 and len(kuberay("RayJob")) == 2


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: os.path.relpath(p, DEPLOY))
def test_every_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path}: no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"


# --- `ray up` files: Ray's own validation --------------------------------------------------------------------
@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_passes_rays_validation(cloud):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_launcher(cloud)
    assert config["provider"]["type"] == cloud
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on a schema violation


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_node_types(cloud):
    """A CPU head that takes no trial, GPU worker types with autoscaling bounds, idle nodes released."""
    config = load_launcher(cloud)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers
    for name, t in workers.items():
        assert t["resources"].get("GPU", 0) >= 1, name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_runs_the_project_image(cloud):
    """Docker with the project's image on every node; nothing pip-installed over it (Ray's defaults would)."""
    config = load_launcher(cloud)
    assert config["docker"]["image"].endswith(image_tag_suffix())
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert key in config, f"{key} missing: Ray's default would pip-install a Ray wheel"
        assert not any("pip install" in c for c in config[key]), key
    # The image's ENTRYPOINT is the CLI; Ray starts node containers as `docker run ... IMAGE bash`.
    assert "--entrypoint=" in config["docker"]["run_options"]


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_token_auth_on_every_node(cloud):
    """RAY_AUTH_MODE=token in every node's container; the token comes from a mounted file, not the YAML."""
    config = load_launcher(cloud)
    options = config["docker"]["run_options"]
    assert "--env=RAY_AUTH_MODE=token" in options
    (token_path,) = [o.split("=", 2)[2] for o in options if o.startswith("--env=RAY_AUTH_TOKEN_PATH=")]
    assert posixpath.dirname(token_path) in config["file_mounts"]  # file_mounts reach the head and every worker
    with open(LAUNCHERS[cloud]) as f:
        assert "RAY_AUTH_TOKEN=" not in f.read()


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_does_not_expose_the_dashboard(cloud):
    config = load_launcher(cloud)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        assert not (public and rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", 65535)), rule


# --- KubeRay: the fields KubeRay needs ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_objects_have_identity(kind):
    for d in kuberay(kind):
        assert d["apiVersion"] == "ray.io/v1"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), d["metadata"]


def test_kuberay_field_names_are_known():
    def unknown(obj: dict, type_name: str) -> set[str]:
        return set(obj) - KUBERAY_FIELDS[type_name]

    for job in kuberay("RayJob"):
        assert not unknown(job["spec"], "RayJobSpec"), job["metadata"]["name"]
    for where, spec in cluster_specs():
        assert not unknown(spec, "RayClusterSpec"), where
        assert not unknown(spec.get("authOptions", {}), "AuthOptions"), where
        assert not unknown(spec.get("autoscalerOptions", {}), "AutoscalerOptions"), where
        assert not unknown(spec["headGroupSpec"], "HeadGroupSpec"), where
        for group in spec["workerGroupSpecs"]:
            assert not unknown(group, "WorkerGroupSpec"), f"{where} {group['groupName']}"


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_head_and_gpu_worker_groups(where, spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", f"{where}: trials could land on the head"
    assert ray_container(head)["image"].endswith(image_tag_suffix())
    assert GPU not in ray_container(head)["resources"].get("limits", {})
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["workerGroupSpecs"], where
    for group in spec["workerGroupSpecs"]:
        name = f"{where} {group['groupName']}"
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1, name
        container = ray_container(group)
        assert container["image"] == ray_container(head)["image"], name
        gpus = container["resources"]["limits"][GPU]
        assert int(gpus) >= 1 and int(group["rayStartParams"]["num-gpus"]) == int(gpus), name


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_ray_start_params_are_strings(where, spec):
    """KubeRay's rayStartParams is map[string]string: a bare number is rejected by the CRD."""
    for name, group in ray_groups(spec):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{where} {name}"


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_token_auth_from_a_secret_on_every_ray_container(where, spec):
    secret = spec["authOptions"]["secretName"]
    assert spec["authOptions"]["mode"] == "token"
    for name, group in ray_groups(spec):
        env = env_of(ray_container(group))
        assert env["RAY_AUTH_MODE"].get("value") == "token", f"{where} {name}"
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, f"{where} {name}: a literal token in a manifest"
        assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": AUTH_SECRET_KEY}, f"{where} {name}"


def test_rayjobs_run_the_raycluster():
    """The RayJobs embed the RayCluster's spec verbatim: one cluster shape to review, however it is started."""
    (cluster,) = kuberay("RayCluster")
    for job in kuberay("RayJob"):
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], job["metadata"]["name"]


# --- nothing public, nothing secret -------------------------------------------------------------------------------
def test_no_public_service_or_ingress():
    for where, d in all_docs():
        assert d.get("kind") not in {"Ingress", "Gateway", "HTTPRoute", "Route"}, where
        if d.get("kind") == "Service":
            assert d.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", where
    for where, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert head.get("enableIngress", False) is False, where
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", where


def test_no_credentials_in_manifests():
    for where, d in all_docs():
        assert not (d.get("kind") == "Secret" and (d.get("data") or d.get("stringData"))), where
    for where, spec in cluster_specs():
        for name, group in ray_groups(spec):
            for env in ray_container(group).get("env", []):
                secretive = re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", env["name"])
                assert not (secretive and "value" in env), f"{where} {name}: {env['name']} has a literal value"
    for path in yaml_files():
        with open(path) as f:
            text = f.read()
        assert not re.search(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|GOOGLE_APPLICATION_CREDENTIALS", text), path


# --- RayJobs: real command lines, the grid mounted -------------------------------------------------------------
def test_submit_job_runs_repurpose_submit_on_the_mounted_grid():
    job = find_job("submit")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("repurpose submit ")
    args = parse_entrypoint(spec["entrypoint"])
    assert args.command == "submit" and args.storage.startswith(("s3://", "gs://"))
    head_pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head_pod["containers"][0].get("volumeMounts", [])}
    volumes = {v["name"]: v for v in head_pod.get("volumes", [])}
    mount = posixpath.dirname(args.grid)
    assert mount in mounts, f"{args.grid} is not under a volumeMount of the head container"
    assert "configMap" in volumes[mounts[mount]], "the grid comes from a ConfigMap"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] in SUBMISSION_MODES


def test_resume_job_finishes_the_same_sweep_in_the_same_store():
    submit, resume = find_job("submit")["spec"], find_job("resume")["spec"]
    args = parse_entrypoint(resume["entrypoint"])
    with open(os.path.join(REPO, "grids", "paper.yaml")) as f:
        assert args.name == yaml.safe_load(f)["name"]
    assert args.storage == parse_entrypoint(submit["entrypoint"]).storage
    assert resume["shutdownAfterJobFinishes"] is True and resume["submissionMode"] in SUBMISSION_MODES


# --- Dockerfile --------------------------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    with open(DOCKERFILE) as f:
        lines = [ln.rstrip("\n") for ln in f if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in dockerfile() if op == "ARG" and "=" in a)


def test_dockerfile_entry_command_is_an_importable_console_script():
    (entrypoint,) = [json.loads(a) for op, a in dockerfile() if op == "ENTRYPOINT"]
    scripts = pyproject()["project"]["scripts"]
    assert entrypoint[0] in scripts, f"ENTRYPOINT {entrypoint[0]!r} is not a console script of pyproject.toml"
    module, func = scripts[entrypoint[0]].split(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_dockerfile_installs_the_project_as_a_non_root_user():
    steps = dockerfile()
    runs = [a for op, a in steps if op == "RUN"]
    project = [i for i, a in enumerate(runs) if re.search(r"pip install .*\"\.\[([a-z0-9,]+)\]\"", a)]
    assert project, "no RUN pip-installs the project"
    extras = re.search(r"\"\.\[([a-z0-9,]+)\]\"", runs[project[0]]).group(1).split(",")
    assert set(extras) == {"s3", "gcs"} <= set(pyproject()["project"]["optional-dependencies"])
    torch = [i for i, a in enumerate(runs) if re.search(r"pip install .*torch==", a)]
    assert torch and torch[0] < project[0], "torch (the CUDA build) must be installed before the project"
    users = [a.strip() for op, a in steps if op == "USER"]
    assert users and users[-1] not in {"root", "0"}


def test_dockerfile_copies_what_the_package_needs():
    sources = {s for op, a in dockerfile() if op == "COPY" for s in a.split()[:-1] if not s.startswith("--")}
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", pyproject()["project"]["readme"]} <= sources
    assert all(os.path.exists(os.path.join(REPO, s)) for s in sources), sources
    with open(DOCKERFILE + ".dockerignore") as f:
        kept = {ln.strip()[1:] for ln in f if ln.strip().startswith("!")}
    assert sources <= kept, "the build context must keep every COPY source"


def test_one_ray_version_everywhere():
    """The image's Ray (FROM rayproject/ray:<v>, pinned again by pip) is KubeRay's rayVersion and satisfies
    the project's own requirement on ray."""
    version = arg_defaults()["RAY_VERSION"]
    (base,) = [a for op, a in dockerfile() if op == "FROM"]
    python = "py" + pyproject()["project"]["requires-python"].lstrip(">=").replace(".", "")
    assert base.startswith(f"rayproject/ray:${{RAY_VERSION}}-{python}-")
    runs = " ".join(a for op, a in dockerfile() if op == "RUN")
    assert re.search(r"\"ray\[[a-z,]+\]==\$\{RAY_VERSION\}\"", runs), "pip must keep the base image's Ray"
    (ray_req,) = [Requirement(r) for r in pyproject()["project"]["dependencies"] if Requirement(r).name == "ray"]
    assert ray_req.specifier.contains(version)
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == version, where


def test_readme_names_only_files_that_exist():
    with open(os.path.join(DEPLOY, "README.md")) as f:
        text = f.read()
    for path in set(re.findall(r"\bdeploy/[\w./-]*\w", text)):
        assert os.path.exists(os.path.join(REPO, path)), path


# --- the tested versions, and one model cache for the whole cluster ---------------------------------------------
def test_dockerfile_pins_deepspeed_and_transformers_to_the_tested_versions():
    """The image gets the DeepSpeed and transformers these tests ran with (pyproject.toml bounds them only from
    below): the versions installed here, pinned with ==."""
    from importlib.metadata import version

    defaults = arg_defaults()
    runs = " ".join(a for op, a in dockerfile() if op == "RUN")
    for package, arg in (("deepspeed", "DEEPSPEED_VERSION"), ("transformers", "TRANSFORMERS_VERSION")):
        assert defaults.get(arg) == version(package), f"{arg}: {defaults.get(arg)} in the image, {version(package)} tested"
        assert f'"{package}==${{{arg}}}"' in runs, f"pip does not pin {package} to ${{{arg}}}"


def test_every_ray_pod_mounts_the_shared_model_cache():
    """HF_HOME on every Ray container is a folder of one ReadWriteMany PVC (deploy/kuberay/model-cache.yaml), so a
    model is downloaded once per cluster, not once per pod."""
    claims = [d for _, d in all_docs() if d.get("kind") == "PersistentVolumeClaim"]
    (claim,) = [c for c in claims if c["metadata"]["name"] == "repurpose-model-cache"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["resources"]["requests"]["storage"]
    for where, spec in cluster_specs():
        for name, group in ray_groups(spec):
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            cache = [v for v in volumes.values() if v.get("persistentVolumeClaim", {}).get("claimName")
                     == "repurpose-model-cache"]
            assert len(cache) == 1, f"{where} {name}: no model cache volume"
            container = ray_container(group)
            (mount,) = [m for m in container.get("volumeMounts", []) if m["name"] == cache[0]["name"]]
            hf_home = env_of(container)["HF_HOME"]["value"]
            assert not mount.get("readOnly") and posixpath.commonpath([hf_home, mount["mountPath"]]) == \
                mount["mountPath"], f"{where} {name}: HF_HOME {hf_home} is not on the cache ({mount['mountPath']})"
