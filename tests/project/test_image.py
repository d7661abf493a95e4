"""The project's two images, read from their Dockerfiles (no Docker here): the pipeline image carries
every package the project installs; the serving image carries exactly what its four entry points
import, packages and distributions; both start from the official python:3.11-slim pinned by one
digest, end as a numeric non-root user, pass hadolint, and have the health check they should."""
import ast
import importlib.metadata as md
import json
import re
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from deployment.inferenceservice import LIVE_PATH
from tests.support import ROOT

PIPELINE, SERVING = ROOT / "Dockerfile", ROOT / "Dockerfile.serving"
SERVING_ENTRY_POINTS = ("serving.predictor", "serving.transformer", "serving.single", "monitoring.service")
# Distributions only pipelines and training use: none may reach the serving image.
TRAINING_ONLY = {"kfp-kubernetes", "kubeflow-training", "kubeflow-trainer-api", "great-expectations", "mlflow",
                 "typer", "matplotlib", "scikit-learn"}
BASE = re.compile(r"^python:3\.11-slim@sha256:[0-9a-f]{64}$")
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction: comments dropped, continuations joined."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", "\n".join(line for line in text.splitlines()
                                                        if not line.lstrip().startswith("#")))
    return [(word.upper(), rest.strip()) for word, _, rest in
            (line.strip().partition(" ") for line in joined.splitlines() if line.strip())]


def dockerfile_problems(text: str) -> list[str]:
    """Why a Dockerfile breaks the image rules: a FROM that is neither an earlier stage nor the
    digest-pinned official python:3.11-slim, or a last USER that is not a numeric non-root uid."""
    problems, stages, users = [], set(), []
    for word, args in instructions(text):
        if word == "FROM":
            image, _, stage = args.partition(" AS ") if " AS " in args else args.partition(" as ")
            image = image.split()[-1]  # after any --platform=...
            if image not in stages and not BASE.match(image):
                problems.append(f"FROM {image}: not python:3.11-slim@sha256:<digest> nor an earlier stage")
            stages.add(stage.strip())
        elif word == "USER":
            users.append(args)
    last = users[-1] if users else None
    if last is None or not re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", last):
        problems.append(f"USER {last}: the image must end as a numeric non-root uid (runAsNonRoot checks it)")
    return problems


def copied_packages(dockerfile: Path) -> set[str]:
    return set(re.findall(r"^COPY (\w+) \./\1$", dockerfile.read_text(), flags=re.M))


def import_closure(modules: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """(first-party packages, third-party top-level modules) every import of `modules` reaches, read
    from the source, function-level (lazy) imports included."""
    first = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"])
    seen, packages, third, todo = set(), set(), set(), list(modules)
    while todo:
        name = todo.pop()
        path = next((p for p in (ROOT.joinpath(*name.split(".")) / "__init__.py",
                                 ROOT.joinpath(*name.split(".")).with_suffix(".py")) if p.is_file()), None)
        if name in seen or path is None:
            continue
        seen.add(name)
        packages.add(name.split(".")[0])
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]  # parents run first
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for imported in names:
                top = imported.split(".")[0]
                if top in first:
                    todo.append(imported)
                elif top not in sys.stdlib_module_names:
                    third.add(top)
    return packages, third


def requirement_closure(names: list[str]) -> set[str]:
    """Every distribution installing `names` pulls in, read from the installed metadata (markers
    evaluated, extras followed), as normalized names."""
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
    seen, todo = set(), [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        key = (norm(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        for line in md.requires(req.name) or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (*req.extras, "")):
                todo.append(dep)
    return {name for name, _ in seen}


def serving_requirements() -> list[str]:
    lines = (ROOT / "requirements-serving.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_dockerfile_copies_every_installed_package():
    # Given the packages pyproject.toml installs
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {name.rstrip("*") for name in include}
    # When the pipeline Dockerfile's COPY lines and .dockerignore's allowlist are read
    copied = copied_packages(PIPELINE)
    allowed = set(re.findall(r"^!(\w+)/$", (ROOT / ".dockerignore").read_text(), flags=re.M))
    # Then each package is copied into the image, the build context lets it through, and each is a real folder
    assert packages <= copied, f"missing from the Dockerfile: {sorted(packages - copied)}"
    assert copied | copied_packages(SERVING) | {"config"} <= allowed, \
        f".dockerignore keeps out: {sorted((copied | {'config'}) - allowed)}"
    assert all((ROOT / name / "__init__.py").is_file() for name in packages)


def test_the_serving_image_copies_exactly_the_packages_its_entry_points_import():
    # Given every first-party package the predictor, transformer and monitor service import, lazily or not
    packages, _ = import_closure(SERVING_ENTRY_POINTS)
    # Then the serving image copies those and no other (pipelines, training, fleet stay out)
    assert copied_packages(SERVING) == packages
    assert {"pipelines", "training", "components", "fleet"}.isdisjoint(packages)


def test_the_serving_requirements_cover_every_import_and_leave_training_out():
    # Given what requirements-serving.txt installs (with everything it depends on)
    installed = requirement_closure(serving_requirements())
    distributions = md.packages_distributions()
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
    # When the third-party modules the serving entry points import are mapped to distributions
    _, modules = import_closure(SERVING_ENTRY_POINTS)
    missing = {m: distributions.get(m) for m in modules
               if not {norm(d) for d in distributions.get(m, [])} & installed}
    # Then each comes with the serving requirements, and no training-only distribution does
    assert not missing, f"imported by the serving entry points but not in requirements-serving.txt: {missing}"
    assert not TRAINING_ONLY & installed, f"training-only in the serving image: {sorted(TRAINING_ONLY & installed)}"
    assert "s3fs" in installed  # fsspec imports it by protocol name, which no import statement shows


def test_the_serving_requirements_are_pinned_by_the_same_constraints():
    pinned = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
              for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    assert {re.sub(r"[-_.]+", "-", name).lower() for name in serving_requirements()} <= pinned
    for dockerfile in (PIPELINE, SERVING):
        steps = instructions(dockerfile.read_text())
        installs = [args for word, args in steps if word == "RUN" and "pip install" in args]
        assert installs and all("-c constraints.txt" in a or "-c /tmp/constraints.txt" in a or "--no-deps" in a
                                for a in installs), dockerfile.name


@pytest.mark.parametrize("dockerfile", [PIPELINE, SERVING], ids=lambda p: p.name)
def test_each_image_starts_from_the_pinned_base_and_ends_as_a_numeric_non_root_user(dockerfile):
    text = dockerfile.read_text()
    assert dockerfile_problems(text) == []
    froms = [args.split()[0] for word, args in instructions(text) if word == "FROM"]
    assert len(froms) >= 3 and BASE.match(froms[0]), "multi-stage: the pinned base, a builder, a runtime"
    assert "COPY --from=builder /opt/venv /opt/venv" in text  # the runtime takes the built venv, not the build tools


def test_both_images_pin_the_same_base_digest():
    digests = {re.search(r"^FROM (\S+)", path.read_text(), flags=re.M)[1] for path in (PIPELINE, SERVING)}
    assert len(digests) == 1, f"bump the base in both Dockerfiles together: {digests}"


def test_the_image_checker_catches_a_floating_base_and_a_root_user():
    planted = "FROM python:3.11-slim AS base\nFROM base AS runtime\nFROM ubuntu:latest\nUSER root\n"
    problems = dockerfile_problems(planted)
    assert [p.split(":")[0] for p in problems] == ["FROM python", "FROM ubuntu", "USER root"]
    assert dockerfile_problems("FROM python:3.11-slim@sha256:" + "a" * 64 + "\nUSER 0\n") == [
        "USER 0: the image must end as a numeric non-root uid (runAsNonRoot checks it)"]


def hadolint(path: Path, tmp_path: Path) -> list[dict]:
    """hadolint's findings on `path` at every level (style up), with only our config (no user or
    repository config can switch a rule off)."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")
    done = subprocess.run([str(HADOLINT), "--config", str(config), "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=60)
    findings = json.loads(done.stdout or "[]")
    assert (done.returncode != 0) == bool(findings), done.stderr
    return findings


@pytest.mark.parametrize("dockerfile", [PIPELINE, SERVING], ids=lambda p: p.name)
def test_hadolint_passes_each_dockerfile(dockerfile, tmp_path):
    assert hadolint(dockerfile, tmp_path) == []


def test_hadolint_fails_a_planted_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nUSER root\n")
    assert {f["code"] for f in hadolint(bad, tmp_path)} >= {"DL3007", "DL3002"}  # latest tag, root user


def test_the_pipeline_image_leaves_liveness_to_kubernetes():
    checks = [args for word, args in instructions(PIPELINE.read_text()) if word == "HEALTHCHECK"]
    assert checks == ["NONE"]


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == LIVE_PATH else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_the_serving_health_check_probes_kserves_live_path(status, healthy):
    # Given the serving image's HEALTHCHECK command (exec form) and a server answering `status` on LIVE_PATH
    (check,) = [args for word, args in instructions(SERVING.read_text()) if word == "HEALTHCHECK"]
    command = json.loads(check[check.index("CMD") + 3:])
    assert command[:2] == ["python", "-c"] and f"http://127.0.0.1:8080{LIVE_PATH}" in command[2]
    _Health.status = status
    server = HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # When it runs against that server (the default URL's path, on the test's port)
        url = f"http://127.0.0.1:{server.server_port}{LIVE_PATH}"
        done = subprocess.run([sys.executable, "-c", command[2]], env={"FLYWHEEL_HEALTH_URL": url},
                              capture_output=True, timeout=30)
    finally:
        server.shutdown()
    # Then it exits 0 only when the server is live
    assert (done.returncode == 0) == healthy, done.stderr
