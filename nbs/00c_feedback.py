# %%
#| default_exp feedback

# %% [markdown]
# # Feedback
#
# > Corrections from the people who use the service, and the photos it was least sure about, kept where a crash cannot lose or corrupt them, for the next training.

# %% [markdown]
# The loop this stage closes: the service answers, a user who sees a wrong label says so
# (`POST /feedback`, or the buttons on the web page), an operator labels the photos the model
# found hardest (the `/review` page), `catsdogs_prepare --feedback-dir` merges both into a new
# version of the split manifest, `catsdogs_train` trains on it, and promotion and
# `/admin/reload` put the new model in service.
#
# Nothing is kept unless `feedback_dir` is set (`--feedback-dir`, `CATSDOGS_FEEDBACK_DIR`).
# Then the service keeps:
#
# - **recent answers, in memory** (`RecentAnswers`): each answer's `id`, the photo's bytes,
#   the answer and the model version, for `feedback_answer_ttl_s` and at most
#   `feedback_pending_bytes` of photos. An answer nobody corrects never reaches the disk.
# - **corrections, on disk** (`FeedbackStore.correct`): the photo (once per sha256), the answer
#   it got, the model version, when it was answered and corrected, and the label a person gave.
# - **the review queue, on disk** (`FeedbackStore.offer_review`): the photos whose answer had
#   the smallest margin (`answer_margin`), at most `review_queue_size`, the most doubtful kept.
#
# ### Why SQLite beside the files
#
# `feedback.db` is one SQLite database in WAL mode with `synchronous=FULL`, and each photo a
# file named by its sha256 under `photos/`. SQLite gives transactions that survive a crash or
# a power cut once committed, needs no server (the service runs anywhere `catsdogs[serve]`
# installs), lets the uvicorn workers of one machine share the store (SQLite locks between
# processes), and is read by `catsdogs_prepare` with the standard library. The photos stay
# out of the database so that a store of a gigabyte is still a small database, and a photo
# sent twice is stored once.
#
# A correction is acknowledged (HTTP 201) only after both are durable, in this order: the
# photo is written to a temporary file, flushed to disk (`fsync`), renamed to its name and
# its folder flushed; then the row is committed. A crash before the commit leaves at most an
# unreferenced, complete photo (a later correction of the same photo reuses it) or a
# temporary file (removed when a store is opened); no row ever names a missing or partial
# photo. A full store (`feedback_max_bytes`) refuses new photos with `StoreFull` before
# writing anything.

# %%
#| export
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sqlite3
import tarfile
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from PIL import Image

from catsdogs.config import FeedbackSettings
from catsdogs.presets import CLASS_NAMES, NEITHER

# %%
#| hide
from fastcore.test import test_eq, test_fail
from catsdogs.presets import sample_photos

# %%
cat_jpg, dog_jpg = sample_photos("cat", 1)[0], sample_photos("dog", 1)[0]
tmp = tempfile.TemporaryDirectory()
settings = FeedbackSettings(feedback_dir=Path(tmp.name)/"feedback", review_queue_size=2)

# %% [markdown]
# ## How doubtful an answer is
#
# An answer's margin is how far it is from changing, in log-odds: for "cat" or "dog", the
# smaller of its cat/dog log-odds `|logit(p_dog)|` and the distance of `logit(p_cat_or_dog)`
# from the "neither" threshold's; for "neither", that distance alone. When the mirror image
# (flip test-time augmentation) got another answer, the margin is 0. This is uncertainty
# sampling as labelling tools do it: the photos with the smallest margins teach the next
# model most per label. `review_margin` (1.5 log-odds, about 82% sure) decides which answers
# are offered to the queue.

# %%
#| export
LABELS = (*CLASS_NAMES, NEITHER)

def _logit(p:float) -> float:
    p = min(max(float(p), 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))

def answer_margin(answer:dict, # An answer: `label`, `p_dog`, `p_cat_or_dog` (None: closed set), `views_agree` (None: no TTA)
                  threshold:float|None) -> float: # The 'neither' threshold (None: closed set)
    "How far `answer` is from changing, in log-odds (0 when the mirror image disagreed)."
    if answer.get("views_agree") is False: return 0.0
    margins = [abs(_logit(answer["p_dog"]))] if answer["label"] != NEITHER else []
    if answer.get("p_cat_or_dog") is not None and threshold is not None:
        margins.append(abs(_logit(answer["p_cat_or_dog"]) - _logit(threshold)))
    return min(margins) if margins else math.inf


# %%
sure = {"label": "dog", "p_dog": 0.999, "p_cat_or_dog": 0.99}
torn = {"label": "cat", "p_dog": 0.45, "p_cat_or_dog": 0.99}
near_threshold = {"label": "neither", "p_dog": 0.9, "p_cat_or_dog": 0.2}
test_eq(answer_margin({**sure, "views_agree": False}, 0.3), 0.0)
assert answer_margin(torn, 0.3) < answer_margin(near_threshold, 0.3) < settings.review_margin < answer_margin(sure, 0.3)
{name: round(answer_margin(a, 0.3), 3) for name, a in [("sure", sure), ("torn", torn), ("near threshold", near_threshold)]}


# %% [markdown]
# ## Recent answers
#
# The service gives every answer an `id` and, with feedback on, keeps the photo and the answer
# under it for `feedback_answer_ttl_s`, in memory and bounded by `feedback_pending_bytes`: the
# oldest go first. A correction names that `id`; an unknown or expired one is refused. The
# answers live in the process that gave them, so with `catsdogs_serve --workers N` a
# correction must reach the same worker: run one worker per pod behind the Kubernetes Service
# (as `deploy/kubernetes.yaml` does).

# %%
#| export
@dataclass
class Answered:
    "One answer as the service gave it: the photo's bytes, the answer, the model version, when, and its margin."
    data: bytes
    answer: dict # The answer's fields (`label`, `confidence`, `probabilities`, `p_dog`, `p_cat_or_dog`)
    model_version: str
    margin: float = math.inf
    at: float = field(default_factory=time.time)

    @property
    def sha256(self) -> str: return hashlib.sha256(self.data).hexdigest()

class RecentAnswers:
    "The answers of the last `feedback_answer_ttl_s` seconds by id, up to `feedback_pending_bytes` of photos (the oldest go first)."
    def __init__(self, settings:FeedbackSettings, clock:Callable[[], float]=time.time):
        self.ttl_s, self.max_bytes, self.clock = settings.feedback_answer_ttl_s, settings.feedback_pending_bytes, clock
        self.items: OrderedDict[str, Answered] = OrderedDict()
        self.bytes, self.lock = 0, threading.Lock()

    def put(self, answer_id:str, answered:Answered):
        "Keep `answered` under `answer_id`, dropping the oldest answers past the limits."
        with self.lock:
            self.items[answer_id] = answered; self.bytes += len(answered.data)
            self._drop(lambda oldest: self.bytes > self.max_bytes or oldest.at < self.clock() - self.ttl_s)

    def get(self, answer_id:str) -> Answered|None:
        "The answer under `answer_id`, or None when it is unknown or expired."
        with self.lock:
            self._drop(lambda oldest: oldest.at < self.clock() - self.ttl_s)
            return self.items.get(answer_id)

    def _drop(self, too_old:Callable[[Answered], bool]):
        while self.items and too_old(next(iter(self.items.values()))):
            self.bytes -= len(self.items.popitem(last=False)[1].data)

    def __len__(self): return len(self.items)


# %%
now = [1000.0]
recent = RecentAnswers(FeedbackSettings(feedback_answer_ttl_s=60, feedback_pending_bytes=cat_jpg.stat().st_size * 2), clock=lambda: now[0])
for i in range(3): recent.put(f"a{i}", Answered(cat_jpg.read_bytes(), torn, "3f2c9a1b7d4e", at=now[0]))
test_eq((recent.get("a0"), len(recent)), (None, 2))  # two photos fit: the oldest went first
now[0] += 61
test_eq(recent.get("a2"), None)  # expired
len(recent), recent.bytes


# %% [markdown]
# ## Rate limits
#
# Each client address may send `feedback_per_minute` corrections and review labels a minute,
# a token bucket that refills continuously: a burst of that many is fine, then one every
# `60 / feedback_per_minute` seconds. Past it, the service answers 429 with `Retry-After`.

# %%
#| export
class RateLimit:
    "At most `per_minute` events per key over a minute: a token bucket per key that refills continuously."
    def __init__(self, per_minute:int, clock:Callable[[], float]=time.monotonic, max_keys:int=10_000):
        self.capacity, self.rate, self.clock, self.max_keys = float(per_minute), per_minute / 60, clock, max_keys
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self.lock = threading.Lock()

    def wait(self, key:str) -> float:
        "0 (and one event counted) when `key` may act now, else the seconds until it may."
        with self.lock:
            now = self.clock()
            tokens, then = self.buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - then) * self.rate)
            if tokens < 1: return (1 - tokens) / self.rate
            self.buckets[key] = (tokens - 1, now)
            if len(self.buckets) > self.max_keys:  # forget the keys whose bucket has refilled
                self.buckets = {k: v for k, v in self.buckets.items() if v[0] + (now - v[1]) * self.rate < self.capacity}
            return 0.0


# %%
clock = [0.0]
limit = RateLimit(3, clock=lambda: clock[0])
test_eq([limit.wait("10.1.2.3") for _ in range(3)], [0.0, 0.0, 0.0])
waits = [round(limit.wait("10.1.2.3"), 1), limit.wait("10.9.9.9")]  # the fourth waits 20 s; another client does not
clock[0] += 20
test_eq(limit.wait("10.1.2.3"), 0.0)
waits


# %% [markdown]
# ## The store
#
# `FeedbackStore` takes the feedback section and opens (or creates) `feedback_dir`:
#
# ```
# feedback_dir/
#   feedback.db               corrections, review queue, photos (SQLite, WAL)
#   photos/3f/3f2c...e1.jpg   each photo once, named by its sha256
# ```
#
# `correct` stores a correction (a second one for the same answer replaces the first: the
# last word counts); `offer_review` puts a doubtful answer in the review queue, which keeps
# the `review_queue_size` most doubtful; `label_review` turns a queued photo into a
# correction; `corrections` and `review_items` read them back; `export` writes a consistent
# copy of everything as a tar archive (what `GET /admin/feedback.tar` sends).

# %%
#| export
class StoreFull(Exception):
    "The store holds `feedback_max_bytes` of photos: nothing more is taken until its operator exports and clears it."

_SCHEMA = """
CREATE TABLE IF NOT EXISTS photos (sha256 TEXT PRIMARY KEY, file TEXT NOT NULL, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS corrections (id TEXT PRIMARY KEY, sha256 TEXT NOT NULL REFERENCES photos, label TEXT NOT NULL,
    note TEXT, answer TEXT NOT NULL, model_version TEXT NOT NULL, answered_at REAL NOT NULL, corrected_at REAL NOT NULL,
    source TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS review (sha256 TEXT PRIMARY KEY REFERENCES photos, id TEXT NOT NULL, margin REAL NOT NULL,
    answer TEXT NOT NULL, model_version TEXT NOT NULL, answered_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS review_by_margin ON review (margin);
"""
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}

def _fsync_dir(folder:Path):
    fd = os.open(folder, os.O_RDONLY)
    try: os.fsync(fd)
    finally: os.close(fd)

def _durable_write(path:Path, data:bytes):
    "Write `data` to `path` so that it is either absent or whole after a crash: a flushed temporary file, renamed."
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    with open(part, "wb") as f:
        f.write(data); f.flush(); os.fsync(f.fileno())
    os.replace(part, path)
    _fsync_dir(path.parent)

class FeedbackStore:
    "Corrections and the review queue: `feedback.db` and the photos, content-addressed, under `feedback_dir`."
    def __init__(self, settings:FeedbackSettings):
        if settings.feedback_dir is None: raise ValueError("feedback is off: no feedback_dir is set")
        self.folder, self.settings = Path(settings.feedback_dir), settings
        (self.folder/"photos").mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.folder/"feedback.db", timeout=30, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL"); self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.RLock()  # one connection for the process's threads: one statement or transaction at a time
        for part in (self.folder/"photos").glob("*/.tmp-*"):  # a write a crash interrupted (an hour old: not another worker's)
            if part.stat().st_mtime < time.time() - 3600: part.unlink(missing_ok=True)

    def _read(self, sql:str, params:tuple=()) -> list[sqlite3.Row]:
        with self.lock: return self.db.execute(sql, params).fetchall()

    def used_bytes(self) -> int:
        "Bytes of the photos the store holds."
        return self._read("SELECT COALESCE(SUM(bytes), 0) FROM photos")[0][0]

    def waiting(self) -> int:
        "Photos in the review queue."
        return self._read("SELECT COUNT(*) FROM review")[0][0]

    def _keep_photo(self, data:bytes) -> str:
        "Write the photo (once per sha256) and record it in the open transaction; `StoreFull` when it does not fit."
        sha = hashlib.sha256(data).hexdigest()
        if self.db.execute("SELECT 1 FROM photos WHERE sha256 = ?", (sha,)).fetchone(): return sha
        if self.used_bytes() + len(data) > self.settings.feedback_max_bytes:
            raise StoreFull(f"the feedback store is full ({self.settings.feedback_max_bytes:,} bytes of photos)")
        try: ext = _EXTENSIONS.get(Image.open(io.BytesIO(data)).format, ".img")
        except Exception: ext = ".img"
        rel = f"photos/{sha[:2]}/{sha}{ext}"
        _durable_write(self.folder/rel, data)
        self.db.execute("INSERT INTO photos VALUES (?, ?, ?)", (sha, rel, len(data)))
        return sha

    def _drop_photo_if_unused(self, sha:str) -> Path|None:
        "Forget a photo no correction or review item names; its file, to remove once committed."
        used = self.db.execute("SELECT 1 FROM corrections WHERE sha256 = ? UNION SELECT 1 FROM review WHERE sha256 = ?", (sha, sha)).fetchone()
        if used: return None
        row = self.db.execute("SELECT file FROM photos WHERE sha256 = ?", (sha,)).fetchone()
        self.db.execute("DELETE FROM photos WHERE sha256 = ?", (sha,))
        return self.folder/row["file"] if row else None

    def correct(self, answer_id:str, answered:Answered, label:str, note:str|None=None, source:str="feedback") -> dict:
        "Store a correction of the answer `answer_id` durably (its photo first); returns it as `corrections` lists it."
        if label not in LABELS: raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                sha = self._keep_photo(answered.data)
                self.db.execute("INSERT OR REPLACE INTO corrections VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (answer_id, sha, label, note, json.dumps(answered.answer), answered.model_version, answered.at,
                                 time.time(), source))
                self.db.execute("DELETE FROM review WHERE sha256 = ?", (sha,))  # labelled now: no longer waiting
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK"); raise
        return self.correction(answer_id)

    def offer_review(self, answer_id:str, answered:Answered) -> bool:
        "Queue a doubtful answer's photo for review if it is among the `review_queue_size` most doubtful; whether it was queued."
        size = self.settings.review_queue_size
        if size == 0: return False
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            removed = None
            try:
                sha = answered.sha256
                known = self.db.execute("SELECT 1 FROM review WHERE sha256 = ? UNION SELECT 1 FROM corrections WHERE sha256 = ?", (sha, sha))
                if known.fetchone(): self.db.execute("ROLLBACK"); return False
                if self.db.execute("SELECT COUNT(*) FROM review").fetchone()[0] >= size:
                    least = self.db.execute("SELECT sha256, margin FROM review ORDER BY margin DESC LIMIT 1").fetchone()
                    if least["margin"] <= answered.margin: self.db.execute("ROLLBACK"); return False
                    self.db.execute("DELETE FROM review WHERE sha256 = ?", (least["sha256"],))
                    removed = self._drop_photo_if_unused(least["sha256"])
                self._keep_photo(answered.data)
                self.db.execute("INSERT INTO review VALUES (?, ?, ?, ?, ?, ?)", (sha, answer_id, answered.margin,
                                json.dumps(answered.answer), answered.model_version, answered.at))
                self.db.execute("COMMIT")
            except StoreFull:
                self.db.execute("ROLLBACK"); return False
            except BaseException:
                self.db.execute("ROLLBACK"); raise
        if removed: removed.unlink(missing_ok=True)
        return True

    def label_review(self, sha256:str, label:str) -> dict:
        "Turn the queued photo `sha256` into a correction with `label` (source `review`); `KeyError` when it is not queued."
        rows = self._read("SELECT r.*, p.file FROM review r JOIN photos p USING (sha256) WHERE r.sha256 = ?", (sha256,))
        if not rows: raise KeyError(sha256)
        row = rows[0]
        photo = (self.folder/row["file"]).read_bytes()
        answered = Answered(photo, json.loads(row["answer"]), row["model_version"], row["margin"], row["answered_at"])
        return self.correct(row["id"], answered, label, source="review")

    def _listed(self, row:sqlite3.Row) -> dict:
        item = {k: row[k] for k in row.keys()}
        item["answer"] = json.loads(item["answer"])
        item["path"] = self.folder/item.pop("file")
        return item

    def correction(self, answer_id:str) -> dict:
        "One correction, as `corrections` lists it."
        return self._listed(self._read("SELECT c.*, p.file FROM corrections c JOIN photos p USING (sha256) WHERE c.id = ?",
                                       (answer_id,))[0])

    def corrections(self) -> list[dict]:
        "Every correction, oldest first: id, sha256, label, note, answer, model_version, answered_at, corrected_at, source, path."
        return [self._listed(r) for r in self._read("SELECT c.*, p.file FROM corrections c JOIN photos p USING (sha256) "
                                                    "ORDER BY c.corrected_at, c.id")]

    def review_items(self, limit:int=100) -> list[dict]:
        "The review queue, most doubtful (smallest margin) first."
        return [self._listed(r) for r in self._read("SELECT r.*, p.file FROM review r JOIN photos p USING (sha256) "
                                                    "ORDER BY r.margin, r.answered_at LIMIT ?", (limit,))]

    def photo_path(self, sha256:str) -> Path|None:
        "The file of a photo the store holds, or None."
        rows = self._read("SELECT file FROM photos WHERE sha256 = ?", (sha256,))
        return self.folder/rows[0]["file"] if rows else None

    def export(self, out:BinaryIO):
        "Write a consistent copy of the store (a snapshot of `feedback.db`, then the photos it names) to `out` as a tar archive."
        with tempfile.TemporaryDirectory(prefix="catsdogs-feedback-") as tmp:
            snapshot = sqlite3.connect(Path(tmp)/"feedback.db")
            with self.lock: self.db.backup(snapshot)
            files = [r[0] for r in snapshot.execute("SELECT file FROM photos ORDER BY file")]
            snapshot.close()
            with tarfile.open(fileobj=out, mode="w") as tar:
                tar.add(Path(tmp)/"feedback.db", "feedback.db")
                for rel in files: tar.add(self.folder/rel, rel)

    def close(self):
        "Close the database (the files stay)."
        self.db.close()


# %% [markdown]
# A correction from a user and two doubtful answers offered to a queue of two; a third, less
# doubtful, does not get in, and labelling a queued photo makes it a correction:

# %%
store = FeedbackStore(settings)
wrong = Answered(cat_jpg.read_bytes(), {"label": "dog", "confidence": 0.55, "p_dog": 0.55, "p_cat_or_dog": 0.97}, "3f2c9a1b7d4e")
stored = store.correct("answer-1", wrong, "cat", note="my cat Tom")
test_eq((stored["label"], stored["answer"]["label"], stored["path"].read_bytes() == cat_jpg.read_bytes()), ("cat", "dog", True))
photos = [p for label in ("cat", "dog") for p in sample_photos(label, 3)[1:]]
offered = [store.offer_review(f"answer-{i + 2}", Answered(p.read_bytes(), torn, "3f2c9a1b7d4e", margin=m))
           for i, (p, m) in enumerate(zip(photos, [0.5, 0.1, 0.9, 0.05]))]
test_eq(offered, [True, True, False, True])  # 0.9 is less doubtful than both; 0.05 then takes the place of 0.5
test_eq(([round(item["margin"], 2) for item in store.review_items()], store.waiting()), ([0.05, 0.1], 2))
store.label_review(store.review_items()[0]["sha256"], "neither")
[{k: c[k] for k in ("id", "label", "source", "note")} for c in store.corrections()], len(store.review_items())

# %% [markdown]
# Only the photos in the queue or corrected stay on disk, and a full store refuses before it
# writes:

# %%
test_eq(len(list((settings.feedback_dir/"photos").glob("*/*"))), 3)  # Tom, the labelled one, the one still queued
small = FeedbackStore(FeedbackSettings(feedback_dir=Path(tmp.name)/"small", feedback_max_bytes=1000))
try: small.correct("answer-9", wrong, "cat")
except StoreFull as e: full = str(e)
test_eq(full, "the feedback store is full (1,000 bytes of photos)")
test_fail(lambda: store.correct("answer-9", wrong, "cow"), contains="label must be one of cat, dog, neither")
test_eq(list((Path(tmp.name)/"small"/"photos").iterdir()), [])
full, store.used_bytes(), small.used_bytes()

# %% [markdown]
# The export is a tar archive with a consistent snapshot of the database, and it opens as a
# store of its own, which is what `catsdogs_prepare --feedback-dir` reads:

# %%
archive = io.BytesIO()
store.export(archive)
archive.seek(0)
with tarfile.open(fileobj=archive) as tar:
    names = tar.getnames()
    tar.extractall(Path(tmp.name)/"exported", filter="data")
copy = FeedbackStore(FeedbackSettings(feedback_dir=Path(tmp.name)/"exported"))
test_eq([c["id"] for c in copy.corrections()], [c["id"] for c in store.corrections()])
names
