"""The deployment kit in deploy/: what can be checked without Docker, Kubernetes or Slurm.

* the Dockerfile: every instruction known, the base image pinned to the project's Ray
  (a tag, never ``latest``), every COPY source in the repository and let through by
  its ``.dockerignore``, a non-root user;
* the KubeRay RayJob: parses, uses only fields of KubeRay's ``ray.io/v1`` types, a GPU
  worker group, retries, the Ray token and every credential from Secrets on every pod;
* every ``study …`` command line of the RayJob, the sbatch script and the entrypoint
  script parses with the ``study`` command's own parser (and ``study run`` resumes);
* the shell scripts pass ``bash -n``; no password, key or token is written in deploy/.

None of it builds an image, applies a manifest or submits a job (docs/cluster.md says
what was not run).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from search_spaces import load_space
from study.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
SBATCH = DEPLOY / "slurm" / "study.sbatch"
ENTRYPOINT = DEPLOY / "entrypoint.sh"

DOCKER_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
    "WORKDIR",
}  # fmt: skip

# KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go)
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}  # fmt: skip
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
    "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "rayVersion", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
#: Environment variables that hold a credential: their value must come from a Secret.
SECRET_VARIABLES = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$")


# --- the Dockerfile ---------------------------------------------------------------------


def _docker_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile: comments dropped, ``\\`` lines joined."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word, args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)


def test_dockerfile_instructions_parse_and_the_base_is_pinned() -> None:
    steps = _docker_instructions(DOCKERFILE.read_text())
    unknown = [word for word, _ in steps if word not in DOCKER_INSTRUCTIONS]
    assert not unknown, f"not Dockerfile instructions: {unknown}"
    args: dict[str, str] = {}
    froms = []
    for word, rest in steps:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args.setdefault(name, value.strip('"'))
        if word == "FROM":
            froms.append(_expand(rest.split()[0], args))
    assert len(froms) == 1, froms
    image = froms[0]
    repo, _, tag = image.partition("@")[0].rpartition(":")
    assert repo == "rayproject/ray", image
    assert tag and tag != "latest" and not tag.startswith("latest"), image
    # the image's Ray is the project's: nodes of another Ray version cannot join
    assert tag.startswith(f"{ray.__version__}-py"), (image, ray.__version__)
    assert args["RAY_VERSION"] == ray.__version__
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert any(word == "RUN" and "pip install" in rest and " ." in rest for word, rest in steps)


def test_dockerfile_copies_only_what_the_repository_has() -> None:
    """Every COPY source exists and its .dockerignore lets it through."""
    steps = _docker_instructions(DOCKERFILE.read_text())
    sources = []
    for word, rest in steps:
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            assert len(parts) >= 2, rest
            sources += parts[:-1]
    assert sources
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert "*" in ignore, "the ignore file starts from nothing and lets the sources in"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert source.rstrip("/") in allowed, f"COPY {source}: excluded by the .dockerignore"
    packages = {"study", "trainables", "search_spaces", "reports"}
    assert packages <= set(sources), "every package of pyproject.toml is copied"


# --- the RayJob -----------------------------------------------------------------------


def _rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _containers(job: dict) -> dict[str, dict]:
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    out = {"submitter": spec["submitterPodTemplate"]["spec"]["containers"][0]}
    out["head"] = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in cluster["workerGroupSpecs"]:
        out[group["groupName"]] = group["template"]["spec"]["containers"][0]
    return out


def test_rayjob_uses_kuberay_fields_only() -> None:
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert {"template", "rayStartParams"} <= set(cluster["headGroupSpec"])
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert {"groupName", "rayStartParams", "template"} <= set(group)
    assert cluster["rayVersion"] == ray.__version__
    # a retried entrypoint (a new cluster each time) resumes: `study run --resume`
    assert spec["backoffLimit"] > 0
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_has_a_gpu_worker_group_and_one_image() -> None:
    job = _rayjob()
    containers = _containers(job)
    gpus = [
        c["resources"]["limits"].get("nvidia.com/gpu", 0)
        for name, c in containers.items()
        if name not in ("head", "submitter")
    ]
    assert gpus and all(int(g) >= 1 for g in gpus), gpus
    images = {c["image"] for c in containers.values()}
    assert len(images) == 1, images
    assert not images.pop().endswith(":latest")


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_rayjob_takes_the_token_and_credentials_from_secrets() -> None:
    job = _rayjob()
    for name, container in _containers(job).items():
        env = _env(container)
        assert env["RAY_AUTH_MODE"].get("value") == "token", name
        token = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token["name"] and token["key"], name
        for var, entry in env.items():
            if SECRET_VARIABLES.search(var):
                assert "value" not in entry, f"{name}: {var} is written in the manifest"
                assert "secretKeyRef" in entry.get("valueFrom", {}), (name, var)
        if name == "submitter":
            continue
        assert "secretKeyRef" in env["PGPASSWORD"]["valueFrom"], name
        secrets = {s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s}
        assert {"energy-study-mlflow", "energy-study-s3"} <= secrets, (name, secrets)


# --- the `study …` command lines ------------------------------------------------------


def _unshell(command: str, extra: str = "") -> list[str]:
    """A shell command line as argv: ``${X:-d}`` → d, ``$X`` → a placeholder, ``"$@"`` →
    ``extra``."""
    command = command.replace('"$@"', extra)
    command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", command)
    command = re.sub(r"\$\{?\w+\}?", "PLACEHOLDER", command)
    return shlex.split(command)


def _joined_lines(text: str) -> list[str]:
    """Lines with ``\\`` continuations joined and a leading comment mark dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def _study_commands(text: str) -> list[str]:
    """Every ``study …`` command in a script or an entrypoint (``&&`` chains split)."""
    found = []
    for line in _joined_lines(text):
        for part in line.split("&&"):
            part = part.strip().removeprefix("exec ").strip()
            if part.startswith("study "):
                found.append(part)
    return found


def _parse(argv: list[str], where: str):
    assert argv[0] == "study", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"{where}: `{shlex.join(argv)}` does not parse") from exc


def _entrypoint_extra_args() -> str:
    """What the sbatch script passes to deploy/entrypoint.sh (for its ``"$@"``)."""
    line = next(ln for ln in _joined_lines(SBATCH.read_text()) if "deploy/entrypoint.sh" in ln)
    return line.split("deploy/entrypoint.sh", 1)[1]


@pytest.mark.parametrize(
    ("where", "text"),
    [
        ("rayjob entrypoint", lambda: _rayjob()["spec"]["entrypoint"]),
        ("sbatch", lambda: SBATCH.read_text()),
        ("entrypoint.sh", lambda: ENTRYPOINT.read_text()),
    ],
)
def test_every_study_command_parses(where: str, text) -> None:
    """Needs ``study run --resume`` (the storage helper's); ``study doctor`` once wired."""
    commands = _study_commands(text())
    assert commands, where
    extra = _entrypoint_extra_args() if where == "entrypoint.sh" else ""
    runs = 0
    for command in commands:
        args = _parse(_unshell(command, extra), where)
        if args.command == "run":
            runs += 1
            # a retried job continues the study of that name instead of starting one
            assert args.resume is True, command
            assert args.name, command
            assert args.address == "auto", command
            assert args.space is None or load_space(args.space), command
        elif args.command == "doctor":
            assert args.address == "auto" and args.storage, command
    assert runs >= 1, f"{where}: no `study run`"


def test_the_rayjob_and_sbatch_runs_use_shared_storage() -> None:
    """The RayJob's storage is a URI (S3); every run names the MLflow server."""
    for command in _study_commands(_rayjob()["spec"]["entrypoint"]):
        args = _parse(_unshell(command), "rayjob")
        assert args.storage.startswith("s3://"), command
        assert args.tracking_uri.startswith("http"), command


# --- the shell scripts and secrets ----------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("script", [SBATCH, ENTRYPOINT], ids=lambda p: p.name)
def test_shell_scripts_pass_bash_n(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_gives_every_node_the_same_token_and_requeues() -> None:
    text = SBATCH.read_text()
    assert "#SBATCH --requeue" in text
    assert "export RAY_AUTH_MODE RAY_AUTH_TOKEN" in text
    # the token is made inside the job, not written down
    assert re.search(r"RAY_AUTH_TOKEN=\"\$\(python -c .*secrets\.token_hex", text)
    assert "ray start --head --block" in text and "ray start --block --address" in text


def test_no_credential_is_written_in_deploy() -> None:
    """No ``user:password@`` URI, no ``KEY=value`` or ``KEY: value`` for a secret."""
    inline_uri = re.compile(r"[a-z+]+://[^\s/:@]+:[^\s/@]+@")
    assignment = re.compile(
        r"(?P<name>\b[A-Z_]*(?:PASSWORD|SECRET_ACCESS_KEY|ACCESS_KEY_ID|AUTH_TOKEN)\b)"
        r"\s*[=:]\s*(?P<value>[^\s\\]+)"
    )
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    assert len(files) >= 5, files
    for path in files:
        text = path.read_text()
        assert not inline_uri.search(text), f"{path}: a URI with a password"
        for match in assignment.finditer(text):
            value = match.group("value").strip("'\"")
            assert value.startswith(("$", "{", "valueFrom")) or value == "", (
                f"{path}: {match.group(0)!r} writes a credential"
            )
