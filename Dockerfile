# syntax=docker/dockerfile:1
# The catsdogs HTTP service on CPU.
#
#   docker build -t catsdogs .                                      # model mounted at run time:
#   docker run -p 8000:8000 -v $PWD/artifacts/model:/models:ro catsdogs
#   docker build -t catsdogs --build-arg MODEL_DIR=artifacts/model .  # or baked into the image
#
# Every catsdogs setting can be changed with a CATSDOGS_* variable (e.g. -e CATSDOGS_WORKERS=2).
# The image holds the lean serving install, catsdogs[serve]: ONNX Runtime and OpenVINO, no PyTorch
# (add ,registry for --model models:/NAME@ALIAS). `python benchmarks/bench_serve_install.py` prints
# its installed size.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY setup.py settings.ini pyproject.toml README.md ./
COPY catsdogs ./catsdogs
RUN pip install ".[serve]" && rm -rf /app/build

# Optional: bake a model artifact from the build context into /models (its training checkpoints stay out).
ARG MODEL_DIR=""
RUN --mount=type=bind,target=/ctx mkdir -p /models \
    && if [ -n "$MODEL_DIR" ]; then cp -r "/ctx/$MODEL_DIR/." /models/ && rm -rf /models/checkpoints; fi

RUN useradd --create-home --uid 10001 catsdogs && chown -R catsdogs /models
USER catsdogs

ENV CATSDOGS_MODEL_DIR=/models CATSDOGS_PORT=8000
EXPOSE 8000

# slim has no curl: ask /health with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

CMD ["catsdogs_serve", "--host", "0.0.0.0", "--port", "8000"]
