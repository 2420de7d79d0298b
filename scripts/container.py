"""Build the Dockerfile's image with a model artifact baked in, start a container, and check that it answers
`/health`, `/ready` and a real `/predict` on 127.0.0.1 as a non-root user; print the image's size.

    python scripts/container.py --model-dir artifacts/model [--photo cat.jpg] [--tag catsdogs:check]

The engine is podman (or docker where podman is missing; `CONTAINER_ENGINE` chooses). The Dockerfile starts
`FROM python:3.11-slim`: where that image is not present and cannot be pulled (a machine with no route to a
registry), a stand-in is built from Debian's packages with mmdebstrap, with the same contract (Python 3.11, `python`
and `pip` on PATH, `useradd`), and tagged with that name locally; the Dockerfile is used unchanged.
`tests/test_container.py` runs the same check on a model trained by the test run.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "docker.io/library/python:3.11-slim"  # what `FROM python:3.11-slim` names
CONTAINER_PORT = 8000  # the Dockerfile's EXPOSE and CATSDOGS_PORT


class BaseImageUnavailable(RuntimeError):
    "The Dockerfile's base image is not here, cannot be pulled, and no stand-in can be built."


def engine() -> str | None:
    "The container engine that answers `info`: `CONTAINER_ENGINE`, else podman, else docker; None when none does."
    candidates = [os.environ["CONTAINER_ENGINE"]] if os.environ.get("CONTAINER_ENGINE") else ["podman", "docker"]
    for name in candidates:
        if shutil.which(name):
            try:
                if run(name, "info", check=False, timeout=60).returncode == 0: return name
            except subprocess.TimeoutExpired: pass
    return None


def _env(name: str) -> dict:
    """The environment for `name`. Podman on a machine without a containers.conf of its own gets one with no default
    ulimits (a sandbox may not be allowed to set them); a machine's own configuration is left alone."""
    env = dict(os.environ)
    own = [Path("/etc/containers/containers.conf"), Path.home() / ".config" / "containers" / "containers.conf"]
    if name == "podman" and "CONTAINERS_CONF" not in env and not any(p.exists() for p in own):
        conf = ROOT / "build" / "containers.conf"
        conf.parent.mkdir(exist_ok=True)
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        env["CONTAINERS_CONF"] = str(conf)
    return env


def run(name: str, *args: str, check: bool = True, capture: bool = True, timeout: float | None = None, **kwargs):
    "`name args...`, its output captured as text."
    return subprocess.run([name, *args], check=check, text=True, capture_output=capture, env=_env(name),
                          timeout=timeout, **kwargs)


def image_exists(name: str, image: str) -> bool:
    return run(name, "image", "inspect", image, check=False).returncode == 0


def stand_in_base(name: str, image: str = BASE_IMAGE) -> None:
    """Build `image` from Debian bookworm's packages (Python 3.11 in a venv on PATH, so `pip install` works as in the
    official image) and import it under that name. The machine's CA bundle goes in, so pip trusts what the host trusts."""
    if not shutil.which("mmdebstrap"): raise BaseImageUnavailable(f"{image} is not present, cannot be pulled, and mmdebstrap is missing")
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "base.tar"
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "--customize-hook=chroot \"$1\" python3 -m venv /opt/python",
                        "--customize-hook=cp /etc/ssl/certs/ca-certificates.crt \"$1/etc/ssl/certs/ca-certificates.crt\"",
                        "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
                        "bookworm", str(rootfs)], check=True)
        path = "/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        run(name, "import", "--change", f"ENV PATH={path}", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
            "--change", "LABEL org.catsdogs.stand-in=debian-bookworm-mmdebstrap", "--change", 'CMD ["python3"]',
            str(rootfs), image)


def ensure_base(name: str) -> str:
    "Make sure the Dockerfile's base image is here: pulled (the real one wins over a stand-in), already here, or the stand-in built. Says which."
    try:
        if run(name, "pull", BASE_IMAGE, check=False, timeout=120).returncode == 0: return "pulled"
    except subprocess.TimeoutExpired: pass
    if image_exists(name, BASE_IMAGE):
        labels = run(name, "image", "inspect", "--format", "{{json .Config.Labels}}", BASE_IMAGE).stdout
        return "the stand-in, already built (no registry)" if "org.catsdogs.stand-in" in labels else "present (no registry)"
    try: stand_in_base(name)
    except subprocess.CalledProcessError as e: raise BaseImageUnavailable(f"mmdebstrap failed ({e.returncode}): no Debian mirror?") from e
    return "stand-in built with mmdebstrap (no registry)"


def build(name: str, model_dir: Path, tag: str) -> None:
    "Build the Dockerfile from the checkout with `model_dir` baked into /models (copied into the build context)."
    context_model = ROOT / "artifacts" / f".container-model-{uuid.uuid4().hex[:8]}"
    shutil.copytree(model_dir, context_model, ignore=shutil.ignore_patterns("checkpoints"))
    try:
        podman = ["--format", "docker", "--pull=never"] if name == "podman" else []  # OCI format drops HEALTHCHECK; base made above
        run(name, "build", *podman, "--network", "host", "-t", tag,
            "--build-arg", f"MODEL_DIR={context_model.relative_to(ROOT)}", str(ROOT), capture=False)
    finally:
        shutil.rmtree(context_model, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read() or b"{}")


def _post_photo(url: str, photo: Path) -> tuple[int, dict]:
    "POST `photo` as the raw request body (`Content-Type: image/jpeg`), as `curl --data-binary` does."
    request = urllib.request.Request(url, data=photo.read_bytes(), headers={"Content-Type": "image/jpeg"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as r: return r.status, json.loads(r.read())


def check(name: str, tag: str, photo: Path, timeout: float = 180) -> dict:
    """Start `tag` with its port published on 127.0.0.1, wait until `/ready`, and ask `/health`, `/ready` and
    `/predict` with `photo`; returns what they answered, the container's user and the image's size."""
    container, port = f"catsdogs-check-{uuid.uuid4().hex[:8]}", free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        run(name, "run", "-d", "--name", container, "-p", f"127.0.0.1:{port}:{CONTAINER_PORT}", tag)
        deadline = time.monotonic() + timeout
        while True:
            state = run(name, "inspect", "--format", "{{.State.Running}}", container).stdout.strip()
            if state != "true": raise RuntimeError(f"the container stopped:\n{run(name, 'logs', container, check=False).stderr}")
            try:
                if _get(f"{base}/ready")[0] == 200: break
            except OSError: pass
            if time.monotonic() > deadline: raise TimeoutError(f"not ready after {timeout:.0f} s:\n{run(name, 'logs', container).stderr}")
            time.sleep(1)
        return {"health": _get(f"{base}/health"), "ready": _get(f"{base}/ready"), "predict": _post_photo(f"{base}/predict", photo),
                "user": run(name, "exec", container, "id", "-u").stdout.strip(),
                "image_bytes": int(run(name, "image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())}
    finally:
        run(name, "rm", "-f", container, check=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "model", help="Model artifact to bake into the image")
    parser.add_argument("--photo", type=Path, help="A JPEG to send to /predict (default: the first cat of the sample)")
    parser.add_argument("--tag", default="localhost/catsdogs:check")
    args = parser.parse_args(argv)
    name = engine()
    if name is None: parser.exit(2, "container: no container engine answers (podman or docker, installed and running)\n")
    if not (args.model_dir / "model_config.json").exists(): parser.exit(2, f"container: {args.model_dir} is not a model artifact\n")
    photo = args.photo
    if photo is None:
        sys.path.insert(0, str(ROOT))
        from catsdogs.presets import demo_data_dir
        photo = sorted((demo_data_dir() / "Cat").glob("cat.*.jpg"))[0]
    try: print(f"container: {name}; base image {BASE_IMAGE}: {ensure_base(name)}")
    except BaseImageUnavailable as e: parser.exit(2, f"container: {e}\n")
    started = time.monotonic()
    build(name, args.model_dir, args.tag)
    built = time.monotonic() - started
    result = check(name, args.tag, photo)
    ready = result["ready"][1]
    print(f"container: /health {result['health'][0]}; /ready {result['ready'][0]} (model {ready.get('model_version')}, "
          f"{ready.get('backend')}/{ready.get('precision')}); /predict {result['predict'][0]} {json.dumps(result['predict'][1])}")
    ok = (result["health"][0] == 200 and result["ready"][0] == 200 and result["predict"][0] == 200 and result["user"] != "0")
    print(f"container: image {args.tag} {result['image_bytes'] / 1e6:.0f} MB, built in {built:.0f} s; "
          f"/predict {photo.name}: {result['predict'][1].get('label')}; user id {result['user']}: {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
