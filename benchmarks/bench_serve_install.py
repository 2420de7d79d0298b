"""The lean serving install, measured: what `pip install "catsdogs[serve]"` (the Dockerfile's install)
brings, its size, and that it serves without PyTorch.

    python benchmarks/bench_serve_install.py [--keep DIR] [--model artifacts/model]

With a running Docker daemon it also builds the image and prints its size (`docker image inspect`).
Otherwise (as on this project's machines) it creates a fresh virtual environment, installs
`.[serve]` into it as the Dockerfile does, and prints the installed size of its site-packages (the
bulk of the image beside the ~150 MB python:3.11-slim base) with the ten largest packages. Then
it checks that PyTorch is absent and that `catsdogs_predict` answers for a real photo from that
environment. `--keep DIR` keeps the environment (then `python benchmarks/bench_serve.py
--serve-script DIR/bin/catsdogs_serve` measures the lean server's memory)."""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from catsdogs.presets import shared_sample

REPO = Path(__file__).resolve().parent.parent
SAMPLE = shared_sample()  # ../shared/data/PetImages-mini beside the checkout, or None


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def docker_image_size() -> float | None:
    "The image's size in MB, when a Docker daemon is there to build it."
    if not shutil.which("docker") or subprocess.run(["docker", "info"], capture_output=True).returncode: return None
    subprocess.run(["docker", "build", "-q", "-t", "catsdogs:size-check", str(REPO)], check=True)
    size = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", "catsdogs:size-check"], capture_output=True,
                          text=True, check=True).stdout
    return int(size) / 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, default=None, help="Create the environment here and keep it")
    parser.add_argument("--model", type=Path, default=REPO / "artifacts" / "model")
    args = parser.parse_args(argv)
    image = docker_image_size()
    print(f"Docker image: {image:.0f} MB" if image else "Docker image: no Docker daemon here; measuring the same install in a venv")
    env = args.keep or Path(tempfile.mkdtemp(prefix="catsdogs-serve-venv-"))
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    py = env / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"{REPO}[serve]"], check=True)
    site = next((env / "lib").glob("python*/site-packages"))
    sizes = sorted(((du_mb(p), p.name) for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")), reverse=True)
    print(f"installed: {du_mb(site):.0f} MB in site-packages ({env})")
    for mb, name in sizes[:10]: print(f"  {mb:7.1f} MB  {name}")
    has_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode == 0
    print(f"PyTorch installed: {has_torch}")
    if (args.model / "model_config.json").exists() and SAMPLE is not None:
        photo = sorted((SAMPLE / "Dog").glob("dog.*.jpg"))[0]
        done = subprocess.run([str(env / "bin" / "catsdogs_predict"), str(photo), "--model", str(args.model)], capture_output=True, text=True)
        print(f"catsdogs_predict from the lean install: {done.stdout.strip() or done.stderr.strip()[-300:]}")
    if not args.keep: shutil.rmtree(env)
    return 1 if has_torch else 0


if __name__ == "__main__":
    sys.exit(main())
