"""The Dockerfile: linted by hadolint, parsed by the official parser, and its serving command run
on this host (no Docker engine here) the way the image runs it: without torch or training/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import onnxruntime
import pytest
from docker.utils.build import exclude_paths

from service.manifest import MANIFEST_FILE
from tests.deploy.conftest import (
    DOCKERFILE,
    ROOT,
    ServiceProcess,
    dockerfile_stages,
    image_command,
    service_env,
    tool,
)


def global_args() -> dict[str, str]:
    """ARGs declared before the first FROM, with their defaults."""
    import dockerfile

    out: dict[str, str] = {}
    for c in dockerfile.parse_file(str(DOCKERFILE)):
        if c.cmd == "FROM":
            break
        if c.cmd == "ARG" and "=" in c.value[0]:
            key, _, value = c.value[0].partition("=")
            out[key] = value
    return out


def test_hadolint_finds_nothing() -> None:
    hadolint = tool("hadolint")
    assert (
        "Haskell Dockerfile Linter"
        in subprocess.run(
            [hadolint, "--version"], capture_output=True, text=True, check=True
        ).stdout
    )
    # Default failure threshold: any finding, down to "info", fails.
    r = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_is_not_a_rubber_stamp(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nCMD notsure serve\n")
    r = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3014", "DL3015", "DL3025"):
        assert rule in r.stdout, (rule, r.stdout)


def test_serving_stage_is_the_last_and_runs_notsure_serve_as_non_root() -> None:
    stages = dockerfile_stages()
    serve = stages[-1]
    assert serve.name == "serve"
    assert [c.value for c in serve.all("CMD")] == [("notsure", "serve")]
    env = serve.env()
    assert env["NOTSURE_HOST"] == "0.0.0.0"
    exposed = {port for c in serve.all("EXPOSE") for port in c.value}
    assert {env["NOTSURE_PORT"], env["NOTSURE_GRPC_PORT"]} <= exposed
    # A numeric uid:gid that is not root (Kubernetes' runAsNonRoot can check a number only).
    user = serve.all("USER")[-1].value[0]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, user
    # ... and the image creates that user and group (the name shows in `ps`, files get an owner).
    run = " ".join(c.value[0] for c in serve.all("RUN"))
    assert re.search(rf"groupadd [^&]*--gid {gid}\b", run), run
    assert re.search(rf"useradd [^&]*--uid {uid} [^&]*--gid {gid}\b", run), run
    # The bundled repository is the one the service reads by default.
    assert ("/app/models/", "models/") in serve.copies()
    assert env["NOTSURE_MODEL_REPOSITORY"].rstrip("/") == "/app/models"


def test_healthcheck_probes_readiness() -> None:
    serve = dockerfile_stages()[-1]
    (hc,) = serve.all("HEALTHCHECK")
    assert hc.json and hc.value[0] == "CMD"
    script = dict(serve.copies()).get(hc.value[-1])
    assert script == "deploy/healthcheck.py"
    assert "/v2/health/ready" in (ROOT / script).read_text()
    flags = dict(f.lstrip("-").split("=", 1) for f in hc.flags)
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)


def test_image_holds_only_the_service() -> None:
    """No training code, runs, data or tests go into any stage; pip installs no extras."""
    stages = dockerfile_stages()
    sources = {src.rstrip("/") for st in stages for _, src in st.copies()}
    assert sources >= {"service", "notsure", "models", "pyproject.toml"}
    assert not sources & {"training", "runs", "data", "tests", "."}
    installs = [c.value[0] for st in stages for c in st.all("RUN") if "pip install" in c.value[0]]
    assert installs, "no pip install in the Dockerfile"
    for line in installs:
        assert not re.search(r"pip install[^&;]*\s\.\[", line), f"extras installed: {line}"
        assert "torch" not in line


def test_gpu_and_cpu_variants_share_one_python() -> None:
    """The venv built on Ubuntu runs on the CUDA base only if both are the same Ubuntu release."""
    args = global_args()
    assert args["VARIANT"] == "gpu"
    names = {st.name: st for st in dockerfile_stages()}
    assert names["base-gpu"].base == "${CUDA_IMAGE}"
    assert names["base-cpu"].base == "${UBUNTU_IMAGE}"
    assert names["build"].base == "${UBUNTU_IMAGE}"
    assert names["serve"].base == "base-${VARIANT}"
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu(\d+\.\d+)",
                        args["CUDA_IMAGE"])  # fmt: skip
    assert cuda, args["CUDA_IMAGE"]
    assert args["UBUNTU_IMAGE"] == f"ubuntu:{cuda.group(3)}"


def locked_onnxruntime_gpu() -> str:
    """The onnxruntime-gpu version the image installs: the service lock's pin."""
    lock = (ROOT / "requirements/lock-service.txt").read_text()
    m = re.search(r"^onnxruntime-gpu==([^\s;]+)", lock, re.M)
    assert m, "the service lock pins no onnxruntime-gpu"
    return m.group(1)


def test_cuda_base_matches_the_pinned_onnxruntime_build() -> None:
    """onnxruntime-gpu links one CUDA major; the pinned wheel must find it in the base image."""
    from onnxruntime.capi import build_and_package_info as info

    args = global_args()
    locked = locked_onnxruntime_gpu()
    if info.package_name != "onnxruntime-gpu" or onnxruntime.__version__ != locked:
        pytest.skip(
            f"installed {info.package_name} {onnxruntime.__version__}, the image pins "
            f"onnxruntime-gpu {locked}: its CUDA version is not known here"
        )
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", args["CUDA_IMAGE"])
    assert cuda is not None
    assert info.cuda_version.split(".")[0] == cuda.group(1), (info.cuda_version, cuda.group(0))


def test_dockerignore_keeps_exactly_what_the_build_copies() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]  # fmt: skip
    context = exclude_paths(str(ROOT), patterns)  # docker-py's implementation of the rules
    for st in dockerfile_stages():
        for _, src in st.copies():
            src = src.rstrip("/")
            assert src in context, f"COPY {src} but .dockerignore leaves it out of the context"
            if (ROOT / src).is_dir():
                files = [p for p in (ROOT / src).rglob("*") if p.is_file()
                         and "__pycache__" not in p.parts]  # fmt: skip
                missing = [p for p in files if str(p.relative_to(ROOT)) not in context]
                assert not missing, missing[:5]
    for path in context:
        top = path.split("/")[0]
        assert top not in {"runs", "data", "tests", "training", ".git", "benchmarks"}, path
        assert "__pycache__" not in path, path


# --- the image's command, on this host ---------------------------------------------------------


@pytest.fixture
def no_torch(tmp_path: Path) -> Path:
    """A PYTHONPATH entry that makes torch and training/ unimportable, as in the image."""
    root = tmp_path / "shadow"
    for name in ("torch", "torchvision", "training"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not in the serving image')\n"
        )
    return root


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, run on this host."""
    serve = dockerfile_stages()[-1]
    argv = image_command(serve.all("HEALTHCHECK")[0].value[1:], serve.copies())
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


def bundled_models() -> list[str]:
    return sorted(p.parent.parent.name for p in (ROOT / "models").glob(f"*/*/{MANIFEST_FILE}"))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("repository", ["bundled", "mounted"])
def test_image_command_serves_and_reports_healthy(
    repository: str, no_torch: Path, model_repo: Path, tmp_path: Path
) -> None:
    """`notsure serve` with the image's environment answers ready, and so does the HEALTHCHECK.

    bundled: the models/ folder the image copies; mounted: another repository given through
    NOTSURE_MODEL_REPOSITORY, as docker-compose.yml mounts one.
    """
    env = {"PYTHONPATH": str(no_torch), "NOTSURE_DEVICE": "cpu"}
    if repository == "mounted":
        env["NOTSURE_MODEL_REPOSITORY"] = str(model_repo)
        expected = sorted(p.name for p in model_repo.iterdir())
    else:
        expected = bundled_models()
        assert expected, "models/ holds no model: the image would serve nothing"
    service = ServiceProcess(tmp_path, env)
    assert service.env["NOTSURE_MODEL_REPOSITORY"] in (str(ROOT / "models"), str(model_repo))
    with service:
        r = httpx.get(f"{service.url}/v2/health/ready", timeout=5)
        assert r.status_code == 200
        for name in expected:
            assert httpx.get(f"{service.url}/v2/models/{name}/ready", timeout=5).status_code == 200
        probe = healthcheck(service.env)
        assert probe.returncode == 0, probe.stderr
    probe = healthcheck(service.env)
    assert probe.returncode == 1, "healthcheck passes with the service stopped"
    assert "not ready" in probe.stderr


@pytest.mark.integration
def test_healthcheck_sends_a_key_when_health_is_protected(
    no_torch: Path, model_repo: Path, tmp_path: Path
) -> None:
    env = {"PYTHONPATH": str(no_torch), "NOTSURE_DEVICE": "cpu",
           "NOTSURE_MODEL_REPOSITORY": str(model_repo),
           "NOTSURE_API_KEYS": "k-one,k-two", "NOTSURE_PROTECT_HEALTH": "true"}  # fmt: skip
    service = ServiceProcess(tmp_path, env)
    service.ready_headers = {"Authorization": "Bearer k-two"}
    with service:
        assert httpx.get(f"{service.url}/v2/health/ready", timeout=5).status_code == 401
        probe = healthcheck(service.env)
        assert probe.returncode == 0, probe.stderr
        keyless = {k: v for k, v in service.env.items() if k != "NOTSURE_API_KEYS"}
        assert healthcheck(keyless).returncode == 1


def test_healthcheck_fails_without_a_service(tmp_path: Path) -> None:
    from tests.deploy.conftest import free_port

    env = service_env({"NOTSURE_HOST": "127.0.0.1", "NOTSURE_PORT": str(free_port())})
    probe = healthcheck(env)
    assert probe.returncode == 1
    assert sys.executable in image_command(("python",), [])
