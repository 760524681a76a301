"""The rating store: one SQLite file in WAL mode (`<workdir>/ratings.sqlite`).

Tables
    raters    name, SHA-256 of the token (the token itself is never stored), active flag
    batches   the replies one PPO iteration queued: run name, iteration, model step, k, status
              (open -> closed | superseded), the time it was queued and closed
    samples   one reply each: context (problem, user text, user emotion), reply text, its token ids, the guard's
              flags, and, once the batch is closed, the human score the run used (so a resumed run reuses it)
    ratings   score in [0, 1], rubric checkboxes, comment, unsafe flag, time; one per (sample, rater)

Every call opens its own connection (safe from any thread or process). Writes run in `BEGIN IMMEDIATE`
transactions with synchronous=FULL, so a crash or restart loses no committed rating and a rejected request
writes nothing. The store imports no jax: the web app stays light.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import secrets
import sqlite3
import time
from typing import Iterator, Mapping, Optional, Sequence

from therapy_rl.errors import InputError
from therapy_rl.rate.rubric import MAX_COMMENT_CHARS, RUBRIC_KEYS

STORE_FILE = "ratings.sqlite"
SCHEMA_VERSION = 1
MAX_NAME_CHARS = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    active INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    run TEXT NOT NULL,
    iteration INTEGER NOT NULL,
    model_step INTEGER NOT NULL,
    min_ratings INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'closed', 'superseded')),
    created_at REAL NOT NULL,
    closed_at REAL);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_batch_per_iteration ON batches (run, iteration)
    WHERE status != 'superseded';
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches (id),
    row INTEGER NOT NULL,
    problem TEXT NOT NULL,
    user_text TEXT NOT NULL,
    user_emotion TEXT NOT NULL,
    reply TEXT NOT NULL,
    reply_emotion TEXT,
    token_ids TEXT NOT NULL,
    guard_flag INTEGER,
    guard_categories TEXT NOT NULL DEFAULT '[]',
    guard_score REAL,
    used_score REAL,
    used_rated INTEGER,
    used_unsafe INTEGER,
    used_num_ratings INTEGER,
    UNIQUE (batch_id, row));
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY,
    sample_id INTEGER NOT NULL REFERENCES samples (id),
    rater_id INTEGER NOT NULL REFERENCES raters (id),
    score REAL NOT NULL CHECK (score >= 0.0 AND score <= 1.0),
    rubric TEXT NOT NULL,
    comment TEXT NOT NULL,
    unsafe INTEGER NOT NULL CHECK (unsafe IN (0, 1)),
    created_at REAL NOT NULL,
    UNIQUE (sample_id, rater_id));
CREATE INDEX IF NOT EXISTS ratings_by_sample ON ratings (sample_id);
"""


class RatingRejected(Exception):
    """A rating (or rater request) that is refused; `status` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass(frozen=True)
class Rater:
    id: int
    name: str


@dataclasses.dataclass(frozen=True)
class Batch:
    id: int
    run: str
    iteration: int
    model_step: int
    min_ratings: int
    status: str
    created_at: float
    closed_at: Optional[float]


@dataclasses.dataclass(frozen=True)
class NewSample:
    """A reply to queue: its batch row, context, text, token ids and the guard's verdict (flag None = unchecked)."""

    row: int
    problem: str
    user_text: str
    user_emotion: str
    reply: str
    reply_emotion: Optional[str]
    token_ids: tuple[int, ...]
    guard_flag: Optional[bool] = None
    guard_categories: tuple[str, ...] = ()
    guard_score: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Sample:
    id: int
    batch_id: int
    row: int
    problem: str
    user_text: str
    user_emotion: str
    reply: str
    reply_emotion: Optional[str]
    token_ids: tuple[int, ...]
    guard_flag: Optional[bool]
    guard_categories: tuple[str, ...]
    guard_score: Optional[float]
    used_score: Optional[float]
    used_rated: Optional[bool]
    used_unsafe: Optional[bool]
    used_num_ratings: Optional[int]


@dataclasses.dataclass(frozen=True)
class Rating:
    id: int
    sample_id: int
    rater_id: int
    rater: str
    score: float
    rubric: Mapping[str, bool]
    comment: str
    unsafe: bool
    created_at: float


@dataclasses.dataclass(frozen=True)
class UsedScore:
    """What a closed batch's row contributed: the aggregated human score (None when unrated)."""

    score: Optional[float]
    rated: bool
    unsafe: bool
    num_ratings: int


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def store_path(workdir: str) -> str:
    return os.path.join(workdir, STORE_FILE)


def validate_rating(score, rubric, comment, unsafe) -> tuple[float, dict[str, bool], str, bool]:
    """The rating fields checked and normalised; raises RatingRejected(422) naming the bad field."""
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise RatingRejected(422, f"field 'score' must be a number in [0, 1], got {score!r}")
    score = float(score)
    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise RatingRejected(422, f"field 'score' must be in [0, 1], got {score!r}")
    rubric = {} if rubric is None else rubric
    if isinstance(rubric, (list, tuple)):  # the checked keys
        rubric = {key: True for key in rubric}
    if not isinstance(rubric, Mapping):
        raise RatingRejected(422, "field 'rubric' must be an object {criterion: true/false} or a list of criteria")
    unknown = sorted(set(rubric) - set(RUBRIC_KEYS))
    if unknown:
        raise RatingRejected(422, f"field 'rubric' has unknown criteria {unknown}; known: {list(RUBRIC_KEYS)}")
    if not all(isinstance(v, bool) for v in rubric.values()):
        raise RatingRejected(422, "field 'rubric' values must be true or false")
    comment = "" if comment is None else comment
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS:
        raise RatingRejected(422, f"field 'comment' must be text of at most {MAX_COMMENT_CHARS} characters")
    if not isinstance(unsafe, bool):
        raise RatingRejected(422, f"field 'unsafe' must be true or false, got {unsafe!r}")
    return score, {key: bool(rubric.get(key, False)) for key in RUBRIC_KEYS}, comment, unsafe


class RatingStore:
    """The store at `path` (created with its schema on first use)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with self._connect() as db:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"{path}: SQLite refused WAL mode (journal_mode={mode})")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            version = int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
            if version != SCHEMA_VERSION:
                raise RuntimeError(f"{path}: schema version {version}, this code reads {SCHEMA_VERSION}")

    @classmethod
    def in_workdir(cls, workdir: str) -> "RatingStore":
        return cls(store_path(workdir))

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA busy_timeout = 60000")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction that takes the write lock up front; rolled back on any exception."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def journal_mode(self) -> str:
        with self._connect() as db:
            return str(db.execute("PRAGMA journal_mode").fetchone()[0])

    # ------------------------------------------------------------------ raters

    def add_rater(self, name: str) -> str:
        """Registers `name` and returns its token (shown once; only its hash is kept)."""
        name = name.strip()
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise InputError(f"rater name {name!r}: use 1-{MAX_NAME_CHARS} printable characters")
        token = secrets.token_urlsafe(32)
        try:
            with self._write() as db:
                db.execute("INSERT INTO raters (name, token_sha256, created_at) VALUES (?, ?, ?)",
                           (name, token_digest(token), time.time()))
        except sqlite3.IntegrityError as e:
            raise InputError(f"rater {name!r} already exists in {self.path}") from e
        return token

    def rater_for_token(self, token: Optional[str]) -> Optional[Rater]:
        if not token:
            return None
        with self._connect() as db:
            row = db.execute("SELECT id, name FROM raters WHERE token_sha256 = ? AND active = 1",
                             (token_digest(token),)).fetchone()
        return Rater(row["id"], row["name"]) if row else None

    def raters(self) -> list[Rater]:
        with self._connect() as db:
            return [Rater(r["id"], r["name"]) for r in db.execute("SELECT id, name FROM raters ORDER BY id")]

    # ------------------------------------------------------------------ batches (the PPO side)

    def queue_batch(self, run: str, iteration: int, model_step: int, min_ratings: int,
                    samples: Sequence[NewSample]) -> Batch:
        """A new open batch for (run, iteration) holding `samples`; fails if a live batch already exists."""
        now = time.time()
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO batches (run, iteration, model_step, min_ratings, status, created_at) "
                "VALUES (?, ?, ?, ?, 'open', ?)", (run, int(iteration), int(model_step), int(min_ratings), now))
            batch_id = cursor.lastrowid
            db.executemany(
                "INSERT INTO samples (batch_id, row, problem, user_text, user_emotion, reply, reply_emotion, "
                "token_ids, guard_flag, guard_categories, guard_score) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(batch_id, s.row, s.problem, s.user_text, s.user_emotion, s.reply, s.reply_emotion,
                  json.dumps([int(t) for t in s.token_ids]), None if s.guard_flag is None else int(s.guard_flag),
                  json.dumps(list(s.guard_categories)), s.guard_score) for s in samples])
        return self.batch(batch_id)

    def batch(self, batch_id: int) -> Batch:
        with self._connect() as db:
            row = db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise KeyError(f"no batch {batch_id} in {self.path}")
        return _batch(row)

    def live_batch(self, run: str, iteration: int) -> Optional[Batch]:
        """The open or closed batch of (run, iteration), if one was queued."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM batches WHERE run = ? AND iteration = ? AND status != 'superseded'",
                             (run, int(iteration))).fetchone()
        return _batch(row) if row else None

    def batches(self, run: Optional[str] = None) -> list[Batch]:
        with self._connect() as db:
            rows = (db.execute("SELECT * FROM batches WHERE run = ? ORDER BY id", (run,)) if run is not None
                    else db.execute("SELECT * FROM batches ORDER BY id"))
            return [_batch(r) for r in rows]

    def supersede(self, batch_id: int) -> None:
        """Retire an open batch whose replies no longer match the run (its ratings stay for the reward model)."""
        with self._write() as db:
            db.execute("UPDATE batches SET status = 'superseded', closed_at = ? WHERE id = ? AND status = 'open'",
                       (time.time(), batch_id))

    def samples(self, batch_id: int) -> list[Sample]:
        with self._connect() as db:
            return [_sample(r) for r in db.execute("SELECT * FROM samples WHERE batch_id = ? ORDER BY row",
                                                   (batch_id,))]

    def sample(self, sample_id: int) -> Optional[Sample]:
        with self._connect() as db:
            row = db.execute("SELECT * FROM samples WHERE id = ?", (sample_id,)).fetchone()
        return _sample(row) if row else None

    def rating_counts(self, batch_id: int) -> dict[int, int]:
        """{sample id: number of ratings} for every sample of the batch."""
        with self._connect() as db:
            rows = db.execute("SELECT s.id, COUNT(r.id) AS n FROM samples s LEFT JOIN ratings r ON r.sample_id = s.id "
                              "WHERE s.batch_id = ? GROUP BY s.id", (batch_id,))
            return {r["id"]: r["n"] for r in rows}

    def close_batch(self, batch_id: int, used: Mapping[int, UsedScore]) -> None:
        """Records the human score each sample contributed and closes the batch (once; later calls are no-ops)."""
        with self._write() as db:
            status = db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if status is None or status["status"] != "open":
                return
            db.executemany(
                "UPDATE samples SET used_score = ?, used_rated = ?, used_unsafe = ?, used_num_ratings = ? "
                "WHERE id = ? AND batch_id = ?",
                [(u.score, int(u.rated), int(u.unsafe), int(u.num_ratings), sample_id, batch_id)
                 for sample_id, u in used.items()])
            db.execute("UPDATE batches SET status = 'closed', closed_at = ? WHERE id = ?", (time.time(), batch_id))

    # ------------------------------------------------------------------ ratings (the rater side)

    def add_rating(self, rater: Rater, sample_id, score, rubric=None, comment: str = "", unsafe=False) -> int:
        """Stores one rating; raises RatingRejected (422 bad field, 404 unknown or retired sample, 409 repeated)
        and then writes nothing. A rating of a closed batch's reply is kept (it counts for the reward model and
        the agreement report), though that batch's update has already used its scores."""
        if isinstance(sample_id, bool) or not isinstance(sample_id, int):
            raise RatingRejected(422, f"field 'sample_id' must be an integer, got {sample_id!r}")
        score, rubric, comment, unsafe = validate_rating(score, rubric, comment, unsafe)
        with self._write() as db:
            row = db.execute("SELECT b.status FROM samples s JOIN batches b ON b.id = s.batch_id WHERE s.id = ?",
                             (sample_id,)).fetchone()
            if row is None:
                raise RatingRejected(404, f"unknown sample {sample_id}")
            if row["status"] == "superseded":
                raise RatingRejected(404, f"sample {sample_id} belongs to a retired batch")
            try:
                cursor = db.execute(
                    "INSERT INTO ratings (sample_id, rater_id, score, rubric, comment, unsafe, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (sample_id, rater.id, score, json.dumps(rubric), comment, int(unsafe), time.time()))
            except sqlite3.IntegrityError as e:
                if "UNIQUE" in str(e):
                    raise RatingRejected(409, f"rater {rater.name!r} already rated sample {sample_id}") from e
                raise
            return int(cursor.lastrowid)

    def queue_for(self, rater: Rater, limit: int = 20) -> list[Sample]:
        """Samples of open batches this rater has not rated: those still short of k ratings first, oldest
        batch first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM ratings r WHERE r.sample_id = s.id) AS n, b.min_ratings "
                "FROM samples s JOIN batches b ON b.id = s.batch_id "
                "WHERE b.status = 'open' AND NOT EXISTS "
                "  (SELECT 1 FROM ratings r WHERE r.sample_id = s.id AND r.rater_id = ?) "
                "ORDER BY (n >= b.min_ratings), b.id, s.row LIMIT ?", (rater.id, int(limit)))
            return [_sample(r) for r in rows]

    def ratings(self, batch_id: Optional[int] = None) -> list[Rating]:
        """Every rating (or those of one batch), oldest first."""
        query = ("SELECT r.*, t.name AS rater FROM ratings r JOIN raters t ON t.id = r.rater_id "
                 "JOIN samples s ON s.id = r.sample_id")
        with self._connect() as db:
            rows = (db.execute(query + " WHERE s.batch_id = ? ORDER BY r.id", (batch_id,)) if batch_id is not None
                    else db.execute(query + " ORDER BY r.id"))
            return [_rating(r) for r in rows]

    def count_ratings(self, rater: Optional[Rater] = None) -> int:
        with self._connect() as db:
            if rater is None:
                return int(db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0])
            return int(db.execute("SELECT COUNT(*) FROM ratings WHERE rater_id = ?", (rater.id,)).fetchone()[0])

    def rated_samples(self) -> list[tuple[Sample, list[Rating]]]:
        """Every sample with at least one rating, with its ratings (for the reward model and the exports)."""
        by_sample: dict[int, list[Rating]] = {}
        for rating in self.ratings():
            by_sample.setdefault(rating.sample_id, []).append(rating)
        with self._connect() as db:
            samples = {r["id"]: _sample(r) for r in db.execute("SELECT * FROM samples ORDER BY id")}
        return [(samples[sid], by_sample[sid]) for sid in sorted(by_sample)]


def _batch(row: sqlite3.Row) -> Batch:
    return Batch(row["id"], row["run"], row["iteration"], row["model_step"], row["min_ratings"], row["status"],
                 row["created_at"], row["closed_at"])


def _optional_bool(value) -> Optional[bool]:
    return None if value is None else bool(value)


def _sample(row: sqlite3.Row) -> Sample:
    return Sample(row["id"], row["batch_id"], row["row"], row["problem"], row["user_text"], row["user_emotion"],
                  row["reply"], row["reply_emotion"], tuple(json.loads(row["token_ids"])),
                  _optional_bool(row["guard_flag"]), tuple(json.loads(row["guard_categories"])), row["guard_score"],
                  row["used_score"], _optional_bool(row["used_rated"]), _optional_bool(row["used_unsafe"]),
                  row["used_num_ratings"])


def _rating(row: sqlite3.Row) -> Rating:
    return Rating(row["id"], row["sample_id"], row["rater_id"], row["rater"], row["score"], json.loads(row["rubric"]),
                  row["comment"], bool(row["unsafe"]), row["created_at"])
