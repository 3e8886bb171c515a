"""Deployment files: the Dockerfile, docker-compose.yml and deploy/kubernetes/.

No Docker engine here, so the image is never built. Instead:

- the Dockerfile is parsed and checked (multi-stage, slim base, pinned install, non-root user,
  exec-form ENTRYPOINT/CMD/HEALTHCHECK, a .dockerignore that lets every COPY through);
- its build stage is replayed in a fresh virtualenv: the build stage's COPYs into a scratch
  "image root", its ENV, then its RUN commands verbatim (`python3 -m venv "$VIRTUAL_ENV"`,
  `pip install -c constraints.txt .`), once per test session (needs PyPI; skipped without it);
- its runtime stage's ENV, WORKDIR, COPYs, ENTRYPOINT/CMD and HEALTHCHECK are run from that
  root with image paths mapped into it, BGFN_BIND on a free loopback port instead of
  0.0.0.0:8888 and REDIS_URL at the test Valkey: `bgfn serve` passes the HEALTHCHECK command,
  `bgfn worker` runs the example background function, and SIGTERM (what `docker stop` and
  Kubernetes send to PID 1) stops each with exit status 0;
- docker-compose.yml and the Kubernetes manifests are parsed with PyYAML and checked for their
  services, ports, probes, volumes, Redis persistence and grace periods.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from bgfn import defaults
from bgfn.redis_server import free_port
from tests.helpers import ROOT, http, wait_for

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
KUBE_DIR = ROOT / "deploy" / "kubernetes"
HEALTHCHECK_SCRIPT = ROOT / "deploy" / "healthcheck.py"
BACKGROUND_TIME_LIMIT = defaults.BACKGROUND_TIMEOUT  # 900 s, Netlify's 15 minutes
GRACE_MARGIN = 30
"""Least margin (seconds) a worker's stop grace period must have over a whole background job."""
STOP_DEADLINE = 30.0
"""How long a process told to stop (SIGTERM) may take when idle (seconds)."""


# --- the Dockerfile, parsed ----------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """The stage's ENV, in order, values unexpanded."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in shlex.split(instruction.args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {instruction.args!r}: use the KEY=VALUE form"
                values[key] = value
        return values


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def parse_dockerfile(text: str) -> Dockerfile:
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif keyword == "ARG" and not stages:
            key, _, value = rest.partition("=")
            global_args[key] = value
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, rest))
    return Dockerfile(global_args, stages)


def copy_args(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(options, sources, destination) of a COPY."""
    words = instruction.exec_form() or shlex.split(instruction.args)
    options = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        options[key] = value
    return options, words[:-1], words[-1]


def healthcheck_args(instruction: Instruction) -> tuple[dict[str, str], list[str]]:
    """(options, exec-form command) of a HEALTHCHECK."""
    options_text, sep, command = instruction.args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {instruction.args!r}"
    options = dict(word[2:].split("=", 1) for word in options_text.split())
    argv = Instruction("CMD", command).exec_form()
    assert argv is not None, "HEALTHCHECK CMD must be in exec form (a JSON array)"
    return options, argv


def seconds(text: str | int | float) -> float:
    """Docker / compose durations: 30, '30s', '1m30s', '16m', '1h'."""
    if isinstance(text, int | float):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)?", text.strip())
    assert parts and "".join(n + (u or "") for n, u in parts) == text.strip(), f"not a duration: {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001, "": 1}
    return sum(float(n) * scale[u or ""] for n, u in parts)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def load_healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bgfn_deploy_healthcheck", HEALTHCHECK_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- static checks of the Dockerfile ----------------------------------------------------------------

def test_dockerfile_is_multi_stage_on_a_slim_python_base(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2, "expected a build stage and a runtime stage"
    for stage in dockerfile.stages:
        assert re.fullmatch(r"python:3\.1[1-9](\.\d+)?-slim(-\w+)?", stage.base), stage.base
    final = dockerfile.final
    froms = [copy_args(c)[0].get("from") for c in final.all("COPY")]
    assert "build" in froms, "the runtime stage should copy the built virtualenv from the build stage"
    assert not any("pip install" in r.args for r in final.all("RUN")), "no pip install in the runtime stage"


def test_dockerfile_installs_pinned_dependencies_from_constraints(dockerfile: Dockerfile) -> None:
    build = dockerfile.stage("build")
    installs = [r.args for r in build.all("RUN") if "pip install" in r.args]
    assert len(installs) == 1, installs
    assert re.search(r"(-c|--constraint)\s+constraints\.txt\b", installs[0]), installs[0]
    assert "--no-cache-dir" in installs[0] or build.env().get("PIP_NO_CACHE_DIR") == "1"
    sources = [s for c in build.all("COPY") for s in copy_args(c)[1]]
    assert "constraints.txt" in sources
    pins = constraint_pins()
    assert pins, "constraints.txt pins nothing"
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[^=\s]+", line.strip()), f"not an exact pin: {line!r}"


def test_dockerfile_runs_as_a_non_root_user(dockerfile: Dockerfile) -> None:
    user = dockerfile.final.last("USER")
    assert user is not None, "the runtime stage needs a USER"
    name = user.args.split(":")[0]
    assert name not in ("root", "0"), user.args
    runs = " ".join(r.args for r in dockerfile.final.all("RUN"))
    if not name.isdigit():
        assert "useradd" in runs and name in runs
    else:  # Kubernetes' runAsNonRoot can check a numeric user; the same uid exists in /etc/passwd
        assert f"--uid {name}" in runs


def test_dockerfile_entrypoint_and_cmd_are_exec_form(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and cmd is not None
    assert entrypoint.exec_form() == ["bgfn"], "exec form, so bgfn is PID 1 and receives SIGTERM itself"
    assert cmd.exec_form() == ["serve"], "the default command is the web tier"
    stop = final.last("STOPSIGNAL")
    assert stop is None or stop.args in ("SIGTERM", "15")


def test_dockerfile_healthcheck(dockerfile: Dockerfile) -> None:
    instruction = dockerfile.final.last("HEALTHCHECK")
    assert instruction is not None
    options, argv = healthcheck_args(instruction)
    assert seconds(options["timeout"]) > load_healthcheck_module().TIMEOUT
    assert seconds(options["interval"]) >= 5 and "retries" in options and "start-period" in options
    script = argv[1]
    assert argv[0] == "python" and image_source(dockerfile, script) == HEALTHCHECK_SCRIPT
    assert len(argv) == 2, "the image's HEALTHCHECK must work whichever command the container runs"


def test_dockerfile_environment_binds_all_interfaces_only_inside(dockerfile: Dockerfile) -> None:
    env = dockerfile.final.env()
    assert env["BGFN_BIND"] == "0.0.0.0:8888"
    assert env["BGFN_SITE"] == "/site" and dockerfile.final.last("WORKDIR") == Instruction("WORKDIR", "/site")
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert defaults.BIND.startswith("127.0.0.1:"), "outside the image bgfn listens on loopback"
    assert "8888" in dockerfile.final.last("EXPOSE").args  # type: ignore[union-attr]


def test_dockerfile_bakes_in_the_example_site(dockerfile: Dockerfile) -> None:
    copied = {dest: sources for c in dockerfile.final.all("COPY") for _, sources, dest in [copy_args(c)]}
    assert any("netlify.toml" in s for s in copied.values())
    assert any("functions" in s for s in copied.values())
    runs = " ".join(r.args for r in dockerfile.final.all("RUN"))
    assert "/site/.bgfn/example-output" in runs, "the example background function's output folder"


def dockerignore_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go's filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` leave `path` (relative, '/'-separated) out of the build context:
    a pattern matching the path or one of its folders decides; the last such pattern wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_lets_every_copy_through_and_keeps_the_rest_out(dockerfile: Dockerfile) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for stage in dockerfile.stages:
        for instruction in stage.all("COPY"):
            options, sources, _ = copy_args(instruction)
            if "from" in options:
                continue
            for source in sources:
                source_path = ROOT / source
                assert source_path.exists(), source
                files = [source_path] if source_path.is_file() else [
                    p for p in source_path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                for file in files:
                    rel = file.relative_to(ROOT).as_posix()
                    assert not dockerignore_excludes(rel, patterns), f".dockerignore drops {rel}, which COPY needs"
    for unwanted in (".venv/bin/python", ".git/HEAD", ".bgfn/redis/appendonly.aof", "tests/conftest.py",
                     "functions/__pycache__/hello.cpython-311.pyc", "build/lib/bgfn/cli.py"):
        assert dockerignore_excludes(unwanted, patterns), f"{unwanted} would be sent to the Docker build"


def image_source(dockerfile: Dockerfile, image_path: str) -> Path:
    """The repository file the runtime stage COPYs to `image_path`."""
    for instruction in dockerfile.final.all("COPY"):
        options, sources, dest = copy_args(instruction)
        if "from" not in options and len(sources) == 1 and dest == image_path:
            return ROOT / sources[0]
    raise AssertionError(f"no COPY puts a file at {image_path}")


# --- the health check script on its own -------------------------------------------------------------

def test_healthcheck_finds_the_bgfn_command() -> None:
    module = load_healthcheck_module()
    parse = module.parse_command
    assert parse(["/opt/venv/bin/python", "/opt/venv/bin/bgfn", "serve"]) == ("serve", [])
    assert parse(["/opt/venv/bin/python", "/opt/venv/bin/bgfn", "--site", "/x", "worker", "-n", "2"]) == (
        "worker", ["-n", "2"])
    assert parse(["python", "-m", "bgfn", "serve", "--bind", "0.0.0.0:9000"]) == ("serve", ["--bind", "0.0.0.0:9000"])
    assert parse(["/sbin/docker-init", "--", "bgfn", "worker"]) == ("worker", [])  # docker run --init
    assert parse(["python", "/opt/bgfn/healthcheck.py"]) is None
    assert parse(["gunicorn", "app:app"]) is None
    assert module.health_url(["--bind", "0.0.0.0:9000"]) == "http://127.0.0.1:9000/.bgfn/health"
    assert module.health_url(["-b", "[::]:9000"]) == "http://[::1]:9000/.bgfn/health"


# --- the build stage, replayed in a fresh virtualenv -------------------------------------------------

IMAGE_TOP_DIRS = ("opt", "site", "src", "home")
"""Top-level folders of the image this file maps into its scratch root."""


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class ImageRoot:
    """A scratch folder standing in for the image's file system: /opt/venv is ROOT/opt/venv, and so on."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, image_path: str) -> Path:
        assert image_path.startswith("/"), image_path
        assert image_path.split("/")[1] in IMAGE_TOP_DIRS, f"{image_path}: map it in IMAGE_TOP_DIRS"
        return self.root / image_path.lstrip("/")

    def map_value(self, value: str) -> str:
        """Image paths in a ':'-separated value (ENV) replaced by their scratch paths."""
        parts = []
        for part in value.split(":"):
            if part.startswith("/") and part.split("/")[1] in IMAGE_TOP_DIRS:
                part = str(self.path(part))
            parts.append(part)
        return ":".join(parts)


def host_environ() -> dict[str, str]:
    """The environment of the machine running the tests, without this repository's virtualenv or
    bgfn's settings (the image starts from its base image's environment)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BGFN_", "PYTHON", "PIP_")) and k not in ("REDIS_URL", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                  if p and not p.startswith(str(ROOT / ".venv")))
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT"):
        if key in os.environ:  # how this machine reaches PyPI, as a build would be told
            env[key] = os.environ[key]
    return env


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def stage_environ(stage: Stage, image: ImageRoot, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    for key, value in stage.env().items():
        env[key] = expand(image.map_value(value), env)
    return env


def copy_into(image: ImageRoot, workdir: str, instruction: Instruction) -> None:
    options, sources, dest = copy_args(instruction)
    if "from" in options:
        for source in sources:
            assert source == dest, "COPY --from is replayed only for the same path in both stages"
        return
    target = image.path(dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}")
    for source in sources:
        source_path = ROOT / source
        if source_path.is_dir():
            shutil.copytree(source_path, target, ignore=shutil.ignore_patterns("__pycache__", ".bgfn"),
                            dirs_exist_ok=True)
        else:
            into = target / source_path.name if dest.endswith("/") else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source_path, into)


def pypi_unreachable() -> str | None:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/")
    try:
        with urllib.request.urlopen(index.rstrip("/") + "/pip/", timeout=10):
            return None
    except (urllib.error.URLError, OSError) as exc:
        return f"the package index {index} is unreachable ({exc}): cannot replay the image's pip install"


@dataclass
class BuiltImage:
    dockerfile: Dockerfile
    image: ImageRoot
    build_log: str

    @property
    def venv(self) -> Path:
        return self.image.path(self.dockerfile.stage("build").env()["VIRTUAL_ENV"])


@pytest.fixture(scope="session")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """The Dockerfile's build stage, replayed once per session in a fresh virtualenv."""
    reason = pypi_unreachable()
    if reason:
        pytest.skip(reason)
    dockerfile = parse_dockerfile(DOCKERFILE.read_text())
    image = ImageRoot(tmp_path_factory.mktemp("image-root"))
    build = dockerfile.stage("build")
    env = host_environ()
    workdir = "/"
    log = []
    for instruction in build.instructions:
        if instruction.keyword == "ENV":
            env = stage_environ(Stage(build.base, None, [instruction]), image, env)
        elif instruction.keyword == "WORKDIR":
            workdir = instruction.args
            image.path(workdir).mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            copy_into(image, workdir, instruction)
        elif instruction.keyword == "RUN":
            assert instruction.exec_form() is None, "RUN lines are replayed with /bin/sh -c, as Docker does"
            done = subprocess.run(["/bin/sh", "-c", instruction.args], cwd=image.path(workdir), env=env,
                                  capture_output=True, text=True, timeout=600)
            log.append(f"$ {instruction.args}\n{done.stdout}{done.stderr}")
            assert done.returncode == 0, "\n".join(log)
        else:
            raise AssertionError(f"the build stage has {instruction.keyword}, which this test cannot replay")
    return BuiltImage(dockerfile, image, "\n".join(log))


# --- the runtime stage, replayed from the built root -------------------------------------------------

@dataclass
class Runtime:
    """The runtime stage's environment and working folder, mapped into the scratch root."""

    built: BuiltImage
    env: dict[str, str]
    workdir: Path
    port: int

    @property
    def site(self) -> Path:
        return self.built.image.path(self.built.dockerfile.final.env()["BGFN_SITE"])

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, *args: str) -> list[str]:
        """ENTRYPOINT + CMD, or ENTRYPOINT + `args` (as `docker run IMAGE args...`)."""
        final = self.built.dockerfile.final
        entrypoint = final.last("ENTRYPOINT").exec_form()  # type: ignore[union-attr]
        cmd = final.last("CMD").exec_form()  # type: ignore[union-attr]
        assert entrypoint is not None and cmd is not None
        return [*entrypoint, *(args or cmd)]

    def healthcheck(self) -> list[str]:
        instruction = self.built.dockerfile.final.last("HEALTHCHECK")
        assert instruction is not None
        return healthcheck_args(instruction)[1]

    def healthcheck_timeout(self) -> float:
        instruction = self.built.dockerfile.final.last("HEALTHCHECK")
        assert instruction is not None
        return seconds(healthcheck_args(instruction)[0]["timeout"])

    def run_check(self, argv: list[str], pid: int, **env: str) -> subprocess.CompletedProcess[str]:
        """A health check command as Docker runs it: in the container's environment (plus the pid
        of the process to check: outside a container other bgfn processes may be running)."""
        full_env = {**self.env, "BGFN_HEALTHCHECK_PID": str(pid), **env}
        argv = [self.built.image.map_value(arg) for arg in argv]  # /opt/bgfn/... inside the scratch root
        try:
            return subprocess.run(argv, env=full_env, cwd=self.workdir, capture_output=True, text=True,
                                  timeout=self.healthcheck_timeout())
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(argv, 124, str(exc.stdout or ""), f"timed out: {exc}")


@pytest.fixture
def runtime(built_image: BuiltImage, redis_url: str, tmp_path: Path) -> Runtime:
    dockerfile = built_image.dockerfile
    final = dockerfile.final
    image = ImageRoot(tmp_path / "image-root")
    shutil.copytree(built_image.image.root, image.root, symlinks=True,
                    ignore=lambda d, names: ["venv"] if Path(d) == built_image.venv.parent else [])
    # The virtualenv cannot move (its scripts name their python); link it into place.
    venv_path = image.path(dockerfile.stage("build").env()["VIRTUAL_ENV"])
    venv_path.parent.mkdir(parents=True, exist_ok=True)
    venv_path.symlink_to(built_image.venv, target_is_directory=True)
    port = free_port()
    base_env = host_environ()
    base_env["HOME"] = str(image.path("/home/bgfn"))  # Docker sets HOME from USER's passwd entry
    image.path("/home/bgfn").mkdir(parents=True, exist_ok=True)
    workdir = "/"
    for instruction in final.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = instruction.args
            image.path(workdir).mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            copy_into(image, workdir, instruction)
    env = stage_environ(final, image, base_env)
    assert final.env()["BGFN_BIND"] == "0.0.0.0:8888"
    env["BGFN_BIND"] = f"127.0.0.1:{port}"  # a free loopback port instead of 0.0.0.0:8888
    env["REDIS_URL"] = redis_url
    # What the runtime stage's RUN lines do that matters to bgfn (the user is this test's own).
    (image.path("/site") / ".bgfn" / "example-output").mkdir(parents=True, exist_ok=True)
    built = BuiltImage(dockerfile, image, built_image.build_log)
    return Runtime(built, env, image.path(workdir), port)


class Container:
    """One process started like the image's PID 1: its command, environment and working folder."""

    def __init__(self, runtime: Runtime, argv: list[str], log: Path, **env: str) -> None:
        self.argv = argv
        argv = [runtime.built.image.map_value(arg) for arg in argv]
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.popen = subprocess.Popen(argv, env={**runtime.env, **env}, cwd=runtime.workdir, stdout=self._log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def docker_stop(self, deadline: float = STOP_DEADLINE) -> tuple[int | None, float]:
        """SIGTERM to the process alone (as `docker stop` and the kubelet send it to PID 1); its exit
        status (None if it outlived `deadline`) and how long it took."""
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.popen.wait(deadline)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started

    def close(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:  # leave no gunicorn workers or RQ work horses behind
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        self._log.close()


@pytest.fixture
def containers(tmp_path: Path) -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for container in started:
        container.close()


def start(runtime: Runtime, containers: list[Container], *args: str, **env: str) -> Container:
    container = Container(runtime, runtime.command(*args), runtime.workdir.parent / f"{len(containers)}.log", **env)
    containers.append(container)
    return container


def wait_healthy(runtime: Runtime, container: Container, argv: list[str], what: str) -> None:
    last: list[subprocess.CompletedProcess[str]] = []

    def healthy() -> bool:
        assert container.alive(), f"{what}: the process exited: {container.output()}"
        last[:] = [runtime.run_check(argv, container.pid)]
        return last[0].returncode == 0

    try:
        wait_for(healthy, timeout=60, interval=0.5, what=what)
    except AssertionError as exc:
        check = last[0] if last else None
        raise AssertionError(f"{exc}\nlast check: {check}\nprocess output:\n{container.output()}") from None


def site_files(site: Path) -> set[str]:
    return {p.relative_to(site).as_posix() for p in site.rglob("*")}


# --- the image's commands, run -----------------------------------------------------------------------

@pytest.mark.timeout(900)
def test_build_stage_installs_exactly_the_pinned_versions(built_image: BuiltImage) -> None:
    python = built_image.venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=120, check=True)
    installed = {canonical(p["name"]): p["version"] for p in json.loads(done.stdout)}
    pins = constraint_pins()
    unpinned = {name: v for name, v in installed.items()
                if name not in pins and name not in ("bgfn", "pip", "setuptools")}
    assert not unpinned, f"installed but not pinned in constraints.txt: {unpinned}"
    wrong = {name: (v, pins[name]) for name, v in installed.items() if name in pins and pins[name] != v}
    assert not wrong, f"installed versions differ from constraints.txt: {wrong}"
    assert (built_image.venv / "bin" / "bgfn").exists()
    packages = list(built_image.venv.glob("lib/python3*/site-packages/bgfn/cli.py"))
    assert packages, "the image installs bgfn itself, not an editable link to the source"


@pytest.mark.timeout(900)
def test_image_serve_passes_its_healthcheck_and_stops_on_sigterm(runtime: Runtime, containers: list[Container]
                                                                 ) -> None:
    before = site_files(runtime.site)
    web = start(runtime, containers)  # the default CMD: serve
    assert web.argv[-1] == "serve"
    wait_healthy(runtime, web, runtime.healthcheck(), "the image's HEALTHCHECK to pass for bgfn serve")
    compose_check = compose_healthcheck("web")
    assert runtime.run_check(compose_check, web.pid).returncode == 0, "docker-compose.yml's web healthcheck"
    assert http(runtime.base, "GET", "/.bgfn/ready").status == 200
    hello = http(runtime.base, "GET", "/.netlify/functions/hello?name=Ada")
    assert hello.status == 200 and "Ada" in hello.text, hello.text

    code, took = web.docker_stop()
    assert code == 0, f"bgfn serve exited {code} {took:.1f} s after SIGTERM: {web.output()}"
    assert runtime.run_check(runtime.healthcheck(), web.pid).returncode != 0, "healthy after it stopped"
    assert site_files(runtime.site) == before, "bgfn serve wrote into the (root-owned, read-only) site"


@pytest.mark.timeout(900)
def test_image_worker_runs_a_background_job_and_stops_on_sigterm(runtime: Runtime, containers: list[Container]
                                                                 ) -> None:
    before = site_files(runtime.site)
    worker_env = compose_environment("worker")
    web = start(runtime, containers)
    worker = start(runtime, containers, *compose_command("worker"), **worker_env)
    wait_healthy(runtime, web, runtime.healthcheck(), "bgfn serve to be healthy")
    wait_healthy(runtime, worker, runtime.healthcheck(), "the image's HEALTHCHECK to pass for bgfn worker")
    assert runtime.run_check(compose_healthcheck("worker"), worker.pid).returncode == 0

    answer = http(runtime.base, "POST", "/.netlify/functions/report-background", b"weekly",
                  [("content-type", "text/plain")])
    assert answer.status == 202, answer.text
    job_id = answer.header("X-Bgfn-Job-Id")
    output = runtime.site / ".bgfn" / "example-output" / f"{job_id}.json"
    wait_for(output.exists, timeout=60, interval=0.1, what=f"the worker to write {output}: {worker.output()}")
    assert json.loads(output.read_text()) == {"body": "weekly", "function": "report-background"}

    closed = free_port()
    unreachable = runtime.run_check(runtime.healthcheck(), worker.pid, REDIS_URL=f"redis://127.0.0.1:{closed}/0")
    assert unreachable.returncode != 0, "a worker whose Redis does not answer is unhealthy"
    assert "PING" in unreachable.stdout, unreachable.stdout

    for container, what in ((worker, "bgfn worker"), (web, "bgfn serve")):
        code, took = container.docker_stop()
        assert code == 0, f"{what} exited {code} {took:.1f} s after SIGTERM: {container.output()}"
    written = site_files(runtime.site) - before
    assert written == {f".bgfn/example-output/{job_id}.json"}, "only the example's output folder is written"


@pytest.mark.timeout(900)
def test_image_worker_finishes_its_job_on_sigterm(runtime: Runtime, containers: list[Container]) -> None:
    """Graceful: a job running when SIGTERM comes is finished (BGFN_SHUTDOWN_GRACE as docker-compose.yml
    and the worker Deployment set it), then the worker exits 0."""
    started_flag = runtime.site / ".bgfn" / "example-output" / "slow-started"
    done_flag = runtime.site / ".bgfn" / "example-output" / "slow-done"
    (runtime.site / "functions" / "slow-background.py").write_text(
        "import time\nfrom pathlib import Path\n\n"
        "def handler(event, context):\n"
        f"    Path({str(started_flag)!r}).write_text('started')\n"
        "    time.sleep(3)\n"
        f"    Path({str(done_flag)!r}).write_text('done')\n")
    env = compose_environment("worker")
    assert int(env["BGFN_SHUTDOWN_GRACE"]) >= BACKGROUND_TIME_LIMIT
    web = start(runtime, containers)
    worker = start(runtime, containers, *compose_command("worker"), **env)
    wait_healthy(runtime, web, runtime.healthcheck(), "bgfn serve to be healthy")
    assert http(runtime.base, "POST", "/.netlify/functions/slow-background", b"x").status == 202
    wait_for(started_flag.exists, timeout=60, interval=0.05, what=f"the job to start: {worker.output()}")
    code, took = worker.docker_stop(deadline=STOP_DEADLINE + 3)
    assert code == 0, f"bgfn worker exited {code} {took:.1f} s after SIGTERM: {worker.output()}"
    assert done_flag.exists(), f"the running job was not finished: {worker.output()}"
    web.docker_stop()


def scheduler_missing() -> str | None:
    done = subprocess.run([sys.executable, "-m", "bgfn", "scheduler", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    if done.returncode != 0:
        return f"`bgfn scheduler` does not exist yet ({(done.stderr or done.stdout).strip().splitlines()[-1:]})"
    return None


@pytest.mark.timeout(900)
def test_image_scheduler_passes_its_healthcheck_and_stops_on_sigterm(runtime: Runtime, containers: list[Container]
                                                                     ) -> None:
    reason = scheduler_missing()
    if reason:
        pytest.skip(reason)
    scheduler = start(runtime, containers, *compose_command("scheduler"), **compose_environment("scheduler"))
    wait_healthy(runtime, scheduler, runtime.healthcheck(), "the image's HEALTHCHECK to pass for bgfn scheduler")
    assert runtime.run_check(compose_healthcheck("scheduler"), scheduler.pid).returncode == 0
    code, took = scheduler.docker_stop()
    assert code == 0, f"bgfn scheduler exited {code} {took:.1f} s after SIGTERM: {scheduler.output()}"


# --- docker-compose.yml -----------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def compose_service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no {name} service"
    return services[name]  # type: ignore[no-any-return]


def compose_command(name: str) -> list[str]:
    command = compose_service(name).get("command", ["serve"])
    return command if isinstance(command, list) else shlex.split(command)


def compose_environment(name: str) -> dict[str, str]:
    """The service's environment, minus REDIS_URL (the tests point it at their own Valkey)."""
    environment = compose_service(name).get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: str(v) for k, v in environment.items() if k != "REDIS_URL"}


def compose_healthcheck(name: str) -> list[str]:
    """A service's healthcheck command as it runs inside the container (the image's when unset)."""
    test = compose_service(name).get("healthcheck", {}).get("test")
    if test is None:
        instruction = parse_dockerfile(DOCKERFILE.read_text()).final.last("HEALTHCHECK")
        assert instruction is not None
        return healthcheck_args(instruction)[1]
    assert isinstance(test, list) and test[0] == "CMD", f"{name}: healthcheck test should be exec form"
    return list(test[1:])


def test_compose_has_redis_web_worker_and_scheduler() -> None:
    services = compose()["services"]
    assert {"redis", "web", "worker", "scheduler"} <= set(services)
    for name in ("web", "worker", "scheduler"):
        service = services[name]
        assert service.get("build") in (".", {"context": "."}), f"{name} builds the top-level Dockerfile"
        assert service.get("image") == services["web"].get("image"), "one image for every bgfn process"
        assert service["environment"]["REDIS_URL"].startswith("redis://redis:"), name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert compose_command("web") == ["serve"]
    assert compose_command("worker") == ["worker"]
    assert compose_command("scheduler") == ["scheduler"]


def test_compose_redis_persists_with_append_only_file_on_a_volume() -> None:
    redis_service = compose_service("redis")
    command = redis_service["command"]
    command = command if isinstance(command, list) else shlex.split(command)
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    volume, _, target = redis_service["volumes"][0].partition(":")
    assert target.split(":")[0] == "/data" and volume in compose()["volumes"], "a named volume at /data"
    assert "ports" not in redis_service, "Redis is not published on the host"
    assert redis_service["healthcheck"]["test"][-1] == "ping"


def test_compose_web_publishes_8888_with_a_healthcheck() -> None:
    web = compose_service("web")
    targets = [str(p).rsplit(":", 1)[-1] for p in web["ports"]]
    assert "8888" in targets
    assert all(str(p).startswith("127.0.0.1:") for p in web["ports"]), "loopback on the host by default"
    assert compose_healthcheck("web")[1] == "/opt/bgfn/healthcheck.py"
    grace = seconds(web["stop_grace_period"])
    assert grace >= defaults.SYNC_TIMEOUT + defaults.HARD_KILL_GRACE, "gunicorn's graceful timeout fits"
    assert grace < BACKGROUND_TIME_LIMIT


def test_compose_workers_scale_and_get_a_whole_job_to_stop() -> None:
    worker = compose_service("worker")
    assert "ports" not in worker and "container_name" not in worker, "`--scale worker=N` needs neither"
    grace = seconds(worker["stop_grace_period"])
    shutdown = int(compose_environment("worker")["BGFN_SHUTDOWN_GRACE"])
    assert shutdown >= BACKGROUND_TIME_LIMIT, "a 15-minute job may finish before the worker stops"
    assert grace >= shutdown + GRACE_MARGIN, "Docker waits for the worker's own grace before SIGKILL"
    assert compose_healthcheck("worker")[1:] == ["/opt/bgfn/healthcheck.py", "worker"]
    for volume in worker.get("volumes", []):
        assert volume.split(":")[0] in compose()["volumes"], "named volumes only"


def test_compose_scheduler_is_one_service_with_a_grace_period() -> None:
    scheduler = compose_service("scheduler")
    assert "ports" not in scheduler
    assert seconds(scheduler["stop_grace_period"]) >= 10
    assert compose_healthcheck("scheduler")[1:] == ["/opt/bgfn/healthcheck.py", "scheduler"]


# --- Kubernetes -------------------------------------------------------------------------------------

def kube_objects() -> list[dict[str, Any]]:
    objects = []
    for path in sorted(KUBE_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return objects


def kube(kind: str, name: str) -> dict[str, Any]:
    for obj in kube_objects():
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind} {name} in {KUBE_DIR}")


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBE_DIR / "kustomization.yaml").read_text())
    files = {p.name for p in KUBE_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_kube_web_deployment_probes_and_service() -> None:
    web = kube("Deployment", "bgfn-web")
    container = only_container(web)
    assert container["args"] == ["serve"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8888}
    assert env_of(container).get("BGFN_BIND", "0.0.0.0:8888") == "0.0.0.0:8888"
    assert container["livenessProbe"]["httpGet"]["path"] == "/.bgfn/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/.bgfn/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 8888), probe
    spec = web["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] >= (
        float(pre_stop[1]) + defaults.SYNC_TIMEOUT + defaults.HARD_KILL_GRACE), "preStop + gunicorn's graceful timeout"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert web["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    service = kube("Service", "bgfn-web")
    labels = web["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert web["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_kube_worker_gets_a_whole_job_to_stop() -> None:
    worker = kube("Deployment", "bgfn-worker")
    container = only_container(worker)
    assert container["args"] == ["worker"]
    assert "ports" not in container and "readinessProbe" not in container
    shutdown = int(env_of(container)["BGFN_SHUTDOWN_GRACE"])
    assert shutdown >= BACKGROUND_TIME_LIMIT
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= shutdown + GRACE_MARGIN
    assert container["livenessProbe"]["exec"]["command"] == ["python", "/opt/bgfn/healthcheck.py", "worker"]
    assert worker["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_kube_scheduler_is_a_single_replica() -> None:
    scheduler = kube("Deployment", "bgfn-scheduler")
    container = only_container(scheduler)
    assert container["args"] == ["scheduler"]
    assert scheduler["spec"]["replicas"] == 1 and scheduler["spec"]["strategy"]["type"] == "Recreate"
    assert container["livenessProbe"]["exec"]["command"] == ["python", "/opt/bgfn/healthcheck.py", "scheduler"]
    assert scheduler["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 10


def test_kube_containers_match_the_image(dockerfile: Dockerfile) -> None:
    user = dockerfile.final.last("USER")
    assert user is not None
    uid = int(user.args.split(":")[0])
    for name in ("bgfn-web", "bgfn-worker", "bgfn-scheduler"):
        deployment = kube("Deployment", name)
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsUser"] == uid, name
        container = only_container(deployment)
        assert container["image"] == "bgfn", "kustomization.yaml's images: sets the registry and tag"
        assert "command" not in container, "keep the image's ENTRYPOINT (exec form: bgfn is PID 1)"
        env_from = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert {"bgfn-config", "bgfn-redis"} <= env_from, name
        if container["securityContext"].get("readOnlyRootFilesystem"):
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, f"{name}: gunicorn and prometheus-client write to /tmp"
        probe = container.get("livenessProbe", {}).get("exec")
        if probe:
            assert image_source(dockerfile, probe["command"][1]) == HEALTHCHECK_SCRIPT
    assert "REDIS_URL" in kube("Secret", "bgfn-redis")["stringData"]


def test_kube_example_redis_persists_with_append_only_file() -> None:
    redis_set = kube("StatefulSet", "bgfn-redis")
    container = only_container(redis_set)
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    claims = {c["metadata"]["name"] for c in redis_set["spec"]["volumeClaimTemplates"]}
    assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/data"} <= claims
    url = kube("Secret", "bgfn-redis")["stringData"]["REDIS_URL"]
    assert url.startswith(f"redis://{kube('Service', 'bgfn-redis')['metadata']['name']}:6379")


# --- the documentation ------------------------------------------------------------------------------

def test_docs_scale_out_guide_and_readme_deploying_section() -> None:
    guide = (ROOT / "docs" / "scale-out.md").read_text()
    for topic in ("load balancer", "Sentinel", "appendfsync everysec", "terminationGracePeriodSeconds",
                  "arrival rate", "Workers needed per load", "0.012 s"):
        assert topic in guide, topic
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploying", 1)[1].split("\n## ", 1)[0]
    assert "docs/scale-out.md" in section and "never been built" in section
