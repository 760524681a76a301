"""Dataset readers: MESC (CSV + official split), ESConv (JSON Lines), the project's own JSON Lines schema and
the bundled sample. Every reader returns ``(list[Dialogue], ReadReport)``.

Bad records raise ``DataError`` naming file, line and field (``strict=True``) or are skipped and counted by
reason in the ``ReadReport`` (``strict=False``), so nothing is dropped silently. Files are read as bytes and
decoded line by line, so even a bad UTF-8 byte is reported with its line. CSV fields have no size limit short of
memory; a text over ``MAX_TEXT_CHARS`` is cut to that length and counted (``ReadReport.truncated_texts``).
No jax, no models.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Iterable, Iterator, Literal, Mapping, Sequence

from therapy_rl import errors
from therapy_rl.data.labels import EMOTIONS, ESCONV_STRATEGIES, MESC_STRATEGIES

Speaker = Literal["client", "therapist"]
SPEAKERS = ("client", "therapist")

# Reasons a record can be rejected; ReadReport.skipped counts them.
MISSING_FIELD = "missing_field"
UNKNOWN_EMOTION = "unknown_emotion"
EMPTY_TEXT = "empty_text"
UNKNOWN_SPEAKER = "unknown_speaker"
UNKNOWN_STRATEGY = "unknown_strategy"
BAD_VALUE = "bad_value"
BROKEN_CSV = "broken_csv"
BROKEN_JSON = "broken_json"
BAD_UTF8 = "bad_utf8"

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
UNKNOWN_PROBLEM = "unknown"
# Longest text kept, in characters (~2,500 tokens: more than any model's positions, so nothing a model can read is
# lost). A client text keeps its end (the part the reply answers), a therapist text its start.
MAX_TEXT_CHARS = 10_000
CSV_FIELD_LIMIT = 2**31 - 1  # csv's default is 131,072 characters; this is the largest every platform accepts

# MESC official split (Chu et al.): Dialogue_IDs of MESC.csv matched to val.json / test.json, in the order the
# dialogues appear in those files. Every other Dialogue_ID is train (815 dialogues).
MESC_VAL_IDS = (
    3, 25, 31, 44, 55, 59, 60, 76, 86, 88, 96, 101, 109, 136, 158, 184, 198, 199, 218, 231, 244, 256, 280, 281,
    289, 296, 298, 299, 305, 306, 309, 310, 327, 344, 350, 351, 380, 381, 430, 433, 436, 447, 448, 453, 478, 482,
    485, 495, 497, 522, 529, 532, 533, 534, 545, 551, 568, 589, 593, 613, 618, 621, 635, 649, 660, 664, 673, 682,
    693, 704, 706, 711, 712, 717, 720, 731, 737, 781, 789, 790, 809, 826, 865, 883, 886, 887, 889, 899, 918, 946,
    949, 952, 953, 958, 964, 969, 970, 993, 997, 1004, 1008, 1014,
)
MESC_TEST_IDS = (
    10, 23, 30, 39, 54, 63, 66, 67, 70, 72, 100, 107, 110, 120, 139, 168, 174, 208, 209, 210, 213, 215, 237, 254,
    259, 260, 275, 286, 292, 294, 312, 314, 334, 342, 346, 359, 370, 394, 398, 405, 422, 424, 425, 432, 439, 442,
    464, 467, 477, 486, 493, 494, 527, 536, 538, 549, 554, 567, 583, 584, 598, 603, 604, 615, 628, 631, 638, 650,
    657, 665, 666, 692, 715, 723, 736, 749, 752, 753, 756, 762, 787, 802, 827, 832, 836, 841, 842, 879, 881, 895,
    915, 932, 940, 963, 965, 975, 978, 980, 982, 989, 998, 1010,
)
MESC_SPLITS = ("train", "val", "test")
MESC_REQUIRED_COLUMNS = ("Utterance", "Speaker", "Emotion", "Strategy", "Dialogue_ID", "Utterance_ID")
MESC_PROBLEM_TYPE_POLICIES = ("unknown", "json")

# ESConv's dialogue-level seeker emotion -> a MESC label (a judgement call; pass your own map to change it).
DEFAULT_ESCONV_EMOTION_MAP = {
    "anxiety": "fear",
    "nervousness": "fear",
    "fear": "fear",
    "depression": "depression",
    "sadness": "sadness",
    "pain": "sadness",
    "shame": "sadness",
    "guilt": "sadness",
    "anger": "anger",
    "jealousy": "anger",
    "disgust": "disgust",
}
ESCONV_SPEAKERS = {"usr": "client", "seeker": "client", "sys": "therapist", "supporter": "therapist"}


@dataclasses.dataclass(frozen=True)
class Utterance:
    speaker: Speaker  # "client" | "therapist"
    text: str  # stripped, inner whitespace collapsed, never empty
    emotion: str  # one of labels.EMOTIONS
    strategy: str | None  # therapist strategy, None when absent (always None for clients)
    line: int  # line of the file this utterance was read from (1-based; CSV: first line of the row)


@dataclasses.dataclass(frozen=True)
class Dialogue:
    dialogue_id: str
    problem_type: str
    utterances: tuple[Utterance, ...]
    source: str  # "mesc" | "esconv" | "jsonl" | "sample"


class DataError(errors.InputError):
    """A bad record: the message is ``'<file>:<line>: field <field>: <problem>'`` (a user error: one line)."""

    def __init__(self, path: str | Path, line: int, field: str, reason: str, problem: str):
        self.path, self.line, self.field, self.reason = str(path), line, field, reason
        super().__init__(f"{path}:{line}: field {field!r}: {problem} [{reason}]")


@dataclasses.dataclass
class ReadReport:
    """What a reader did: accepted records, skipped records by reason (lenient mode) and the first messages."""

    path: str
    records_read: int = 0  # records accepted (CSV rows, or JSONL lines = dialogues)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    messages: list[str] = dataclasses.field(default_factory=list)  # the first MAX_MESSAGES skip messages
    dialogues: int = 0
    utterances: int = 0
    truncated_texts: int = 0  # texts of this split cut to MAX_TEXT_CHARS

    MAX_MESSAGES = 20

    @property
    def records_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, error: DataError) -> None:
        self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
        if len(self.messages) < self.MAX_MESSAGES:
            self.messages.append(str(error))

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.path}: {self.dialogues} dialogues, {self.utterances} utterances from "
                f"{self.records_read} records; skipped {self.records_skipped} ({reasons}); "
                f"{self.truncated_texts} texts truncated to {MAX_TEXT_CHARS} characters")


# ---------------------------------------------------------------- field checks shared by every reader


def clean_text(text: str) -> str:
    """Strip and collapse whitespace runs (newlines, tabs) to single spaces."""
    return " ".join(text.split())


def _norm_key(name: str) -> str:
    return " ".join(name.lower().split())


_STRATEGY_LOOKUP = {_norm_key(s): s for s in MESC_STRATEGIES + ESCONV_STRATEGIES}
_EMOTION_SET = frozenset(EMOTIONS)


def _check_text(path, line, field, value) -> str:
    if value is None:
        raise DataError(path, line, field, MISSING_FIELD, "missing")
    if not isinstance(value, str):
        raise DataError(path, line, field, BAD_VALUE, f"expected a string, got {type(value).__name__}")
    text = clean_text(value)
    if not text:
        raise DataError(path, line, field, EMPTY_TEXT, "empty text")
    return text


def _check_emotion(path, line, field, value) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(path, line, field, MISSING_FIELD, "missing")
    label = str(value).strip().lower()
    if label not in _EMOTION_SET:
        raise DataError(path, line, field, UNKNOWN_EMOTION, f"unknown emotion {value!r}; expected one of {EMOTIONS}")
    return label


def _check_strategy(path, line, field, value, known: Sequence[str] | None) -> str | None:
    """None/""/"undefined" -> None; a known strategy (any case) -> its canonical spelling; free text when
    ``known`` is None (own JSONL); else DataError."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(path, line, field, BAD_VALUE, f"expected a string, got {type(value).__name__}")
    key = _norm_key(value.strip("[] "))
    if key in ("", "undefined", "none"):
        return None
    if known is None:
        return _STRATEGY_LOOKUP.get(key, clean_text(value))
    for name in known:
        if _norm_key(name) == key:
            return name
    raise DataError(path, line, field, UNKNOWN_STRATEGY, f"unknown strategy {value!r}; expected one of {tuple(known)}")


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


# ---------------------------------------------------------------- line-wise decoding


def _decoded_lines(path: Path) -> tuple[list[str], set[int]]:
    """The file's lines (endings kept) decoded as UTF-8; undecodable bytes become lone surrogates
    (``surrogateescape``) and their 1-based line numbers are returned, so the caller can name line and field."""
    lines, bad = [], set()
    for number, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # UTF-8 byte-order mark
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("utf-8", errors="surrogateescape"))
            bad.add(number)
    return lines, bad


# ---------------------------------------------------------------- MESC-schema CSV (MESC.csv and the bundled sample)


@dataclasses.dataclass(frozen=True)
class _CsvRow:
    dialogue_id: int
    utterance_id: int
    utterance: Utterance


def _iter_csv_rows(path: Path, strict: bool, report: ReadReport) -> Iterator[_CsvRow]:
    """Validated rows of a MESC-schema CSV; bad rows raise (strict) or are counted and skipped."""
    lines, bad_lines = _decoded_lines(path)
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(iter(lines), strict=True)
    header, columns = None, {}
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            error = DataError(path, start, "<row>", BROKEN_CSV, f"broken CSV: {exc}")
            if header is None or strict:
                raise error from None
            report.skip(error)
            continue
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue  # blank line: not a record
        end = reader.line_num
        if header is None:
            if start in bad_lines:
                raise DataError(path, start, "<header>", BAD_UTF8, "invalid UTF-8 in the header")
            header = [c.strip() for c in cells]
            columns = {name: i for i, name in enumerate(header)}
            for name in MESC_REQUIRED_COLUMNS:
                if name not in columns:
                    raise DataError(path, start, name, MISSING_FIELD, f"missing column; header is {header}")
            continue
        try:
            yield _parse_csv_row(path, start, end, cells, header, columns, bad_lines)
            report.records_read += 1
        except DataError as error:
            if strict:
                raise
            report.skip(error)
    if header is None:
        raise DataError(path, 1, "<header>", MISSING_FIELD, "empty file: no CSV header")


def _parse_csv_row(path, start, end, cells, header, columns, bad_lines) -> _CsvRow:
    bad_in_row = sorted(n for n in bad_lines if start <= n <= end)
    if bad_in_row:
        fields = [header[i] if i < len(header) else f"column {i + 1}" for i, c in enumerate(cells)
                  if _has_surrogates(c)]
        raise DataError(path, bad_in_row[0], fields[0] if fields else "<row>", BAD_UTF8, "invalid UTF-8 bytes")
    if len(cells) != len(header):
        raise DataError(path, start, "<row>", BROKEN_CSV,
                        f"broken CSV row: {len(cells)} fields, the header has {len(header)}")
    get = {name: cells[i] for name, i in columns.items()}
    ids = {}
    for name in ("Dialogue_ID", "Utterance_ID"):
        value = get[name].strip()
        if not value:
            raise DataError(path, start, name, MISSING_FIELD, "missing")
        try:
            ids[name] = int(value)
        except ValueError:
            raise DataError(path, start, name, BAD_VALUE, f"expected an integer, got {value!r}") from None
    text = _check_text(path, start, "Utterance", get["Utterance"])
    speaker_raw = get["Speaker"].strip()
    if not speaker_raw:
        raise DataError(path, start, "Speaker", MISSING_FIELD, "missing")
    speaker = speaker_raw.lower()
    if speaker not in SPEAKERS:
        raise DataError(path, start, "Speaker", UNKNOWN_SPEAKER,
                        f"unknown speaker {speaker_raw!r}; expected Client or Therapist")
    emotion = _check_emotion(path, start, "Emotion", get["Emotion"])
    strategy = None
    if speaker == "therapist":
        strategy = _check_strategy(path, start, "Strategy", get["Strategy"], MESC_STRATEGIES)
    return _CsvRow(ids["Dialogue_ID"], ids["Utterance_ID"], Utterance(speaker, text, emotion, strategy, start))


def _read_mesc_csv(path: Path, strict: bool, report: ReadReport) -> dict[int, tuple[Utterance, ...]]:
    """Dialogue_ID -> utterances ordered by Utterance_ID. A duplicated (Dialogue_ID, Utterance_ID) is an error."""
    grouped: dict[int, dict[int, Utterance]] = {}
    for row in _iter_csv_rows(path, strict, report):
        turns = grouped.setdefault(row.dialogue_id, {})
        if row.utterance_id in turns:
            error = DataError(path, row.utterance.line, "Utterance_ID", BAD_VALUE,
                              f"duplicate Utterance_ID {row.utterance_id} in Dialogue_ID {row.dialogue_id} "
                              f"(first on line {turns[row.utterance_id].line})")
            if strict:
                raise error
            report.records_read -= 1
            report.skip(error)
            continue
        turns[row.utterance_id] = row.utterance
    return {d: tuple(turns[k] for k in sorted(turns)) for d, turns in sorted(grouped.items())}


def mesc_csv_path(data_dir: str | Path) -> Path:
    """Accepts the folder holding MESC.csv or its parent (e.g. $THERAPY_RL_DATA with a mesc/ subfolder)."""
    data_dir = Path(data_dir)
    for candidate in (data_dir / "MESC.csv", data_dir / "mesc" / "MESC.csv"):
        if candidate.is_file():
            return candidate
    raise errors.MissingFileError(f"MESC.csv not found in {data_dir} or {data_dir / 'mesc'}; pass "
                                  "--config.data.data_dir=<the folder holding MESC.csv>")


def mesc_split_of(dialogue_id: int) -> str:
    if dialogue_id in _MESC_VAL_SET:
        return "val"
    if dialogue_id in _MESC_TEST_SET:
        return "test"
    return "train"


_MESC_VAL_SET = frozenset(MESC_VAL_IDS)
_MESC_TEST_SET = frozenset(MESC_TEST_IDS)


def _mesc_json_problem_types(json_path: Path, ids: Sequence[int],
                             dialogues: Mapping[int, tuple[Utterance, ...]]) -> dict[int, str]:
    """problem_type per Dialogue_ID from val.json/test.json, whose dialogues come in the order of ``ids``.
    The pairing is checked: same utterance count and each JSON text starts with the CSV text."""
    records = json.loads(json_path.read_text(encoding="utf-8"))
    if len(records) != len(ids):
        raise DataError(json_path, 1, "<list>", BAD_VALUE, f"{len(records)} dialogues, the split has {len(ids)}")
    out = {}
    for position, (record, dialogue_id) in enumerate(zip(records, ids)):
        where = f"[{position}]"
        utterances = dialogues.get(dialogue_id)
        turns = record.get("dialog") or []
        if utterances is None:
            continue  # dialogue fully skipped in lenient mode
        same = len(turns) == len(utterances) and all(
            clean_text(t.get("text", "")).startswith(u.text[:20]) for t, u in zip(turns, utterances))
        if not same:
            raise DataError(json_path, 1, f"{where}.dialog", BAD_VALUE,
                            f"does not match MESC.csv Dialogue_ID {dialogue_id} (utterance count or text)")
        problem = record.get("problem_type")
        if not isinstance(problem, str) or not clean_text(problem):
            raise DataError(json_path, 1, f"{where}.problem_type", MISSING_FIELD, "missing")
        out[dialogue_id] = clean_text(problem)
    return out


def read_mesc(data_dir: str | Path, split: str, strict: bool = True,
              problem_types: str = "unknown") -> tuple[list[Dialogue], ReadReport]:
    """MESC dialogues of the official ``split`` ("train" | "val" | "test") from ``MESC.csv``.

    ``problem_types``: "unknown" (default) gives every dialogue of every split the problem type "unknown",
    because MESC.csv has none and train.json is not available: a model never sees at eval a field it was not
    trained with. "json" takes the val/test problem types from val.json/test.json (train stays "unknown";
    a train/eval mismatch, see data/SCHEMA.md).
    """
    if split not in MESC_SPLITS:
        raise ValueError(f"split must be one of {MESC_SPLITS}, got {split!r}")
    if problem_types not in MESC_PROBLEM_TYPE_POLICIES:
        raise ValueError(f"problem_types must be one of {MESC_PROBLEM_TYPE_POLICIES}, got {problem_types!r}")
    path = mesc_csv_path(data_dir)
    report = ReadReport(str(path))
    grouped = _read_mesc_csv(path, strict, report)
    problems: dict[int, str] = {}
    if problem_types == "json" and split != "train":
        ids = MESC_VAL_IDS if split == "val" else MESC_TEST_IDS
        problems = _mesc_json_problem_types(path.parent / f"{split}.json", ids, grouped)
    dialogues = [Dialogue(str(d), problems.get(d, UNKNOWN_PROBLEM), utterances, "mesc")
                 for d, utterances in grouped.items() if mesc_split_of(d) == split]
    return _finish(report, dialogues)


def read_bundled_sample(split: str, strict: bool = True,
                        sample_dir: str | Path = SAMPLE_DIR) -> tuple[list[Dialogue], ReadReport]:
    """The small counselling sample shipped with the package (written for this project; MESC.csv schema),
    with its split (split.json) and problem types (problem_types.json)."""
    sample_dir = Path(sample_dir)
    split_path = sample_dir / "split.json"
    splits = json.loads(split_path.read_text(encoding="utf-8"))
    if split not in splits:
        raise ValueError(f"split must be one of {tuple(splits)}, got {split!r}")
    problem_path = sample_dir / "problem_types.json"
    problems = json.loads(problem_path.read_text(encoding="utf-8"))
    path = sample_dir / "dialogues.csv"
    report = ReadReport(str(path))
    grouped = _read_mesc_csv(path, strict, report)
    dialogues = []
    for dialogue_id in splits[split]:
        if dialogue_id not in grouped:
            raise DataError(split_path, 1, f"{split}", BAD_VALUE, f"Dialogue_ID {dialogue_id} not in {path.name}")
        problem = problems.get(str(dialogue_id))
        if not problem:
            raise DataError(problem_path, 1, str(dialogue_id), MISSING_FIELD, "no problem type")
        dialogues.append(Dialogue(str(dialogue_id), problem, grouped[dialogue_id], "sample"))
    return _finish(report, dialogues)


def _fit_text(utterance: Utterance) -> Utterance:
    text = utterance.text
    text = text[-MAX_TEXT_CHARS:].lstrip() if utterance.speaker == "client" else text[:MAX_TEXT_CHARS].rstrip()
    return dataclasses.replace(utterance, text=text)


def _finish(report: ReadReport, dialogues: Sequence[Dialogue]) -> tuple[list[Dialogue], ReadReport]:
    """The split's dialogues with over-long texts cut (and counted), and the completed report."""
    fitted = []
    for dialogue in dialogues:
        long = [i for i, u in enumerate(dialogue.utterances) if len(u.text) > MAX_TEXT_CHARS]
        if long:
            report.truncated_texts += len(long)
            dialogue = dataclasses.replace(dialogue, utterances=tuple(
                _fit_text(u) if i in long else u for i, u in enumerate(dialogue.utterances)))
        fitted.append(dialogue)
    report.dialogues = len(fitted)
    report.utterances = sum(len(d.utterances) for d in fitted)
    return fitted, report


# ---------------------------------------------------------------- JSON Lines (ESConv and the project's schema)


def _iter_json_lines(path: Path, strict: bool, report: ReadReport) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; undecodable or broken lines raise or are skipped."""
    lines, bad_lines = _decoded_lines(path)
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                if number in bad_lines:
                    raise DataError(path, number, "<line>", BAD_UTF8, "invalid UTF-8 bytes") from None
                raise DataError(path, number, "<line>", BROKEN_JSON, f"broken JSON: {exc.msg} at column {exc.colno}") from None
            if not isinstance(record, dict):
                raise DataError(path, number, "<line>", BROKEN_JSON, f"expected a JSON object, got {type(record).__name__}")
            if number in bad_lines:
                field = _surrogate_field(record) or "<line>"
                raise DataError(path, number, field, BAD_UTF8, "invalid UTF-8 bytes")
        except DataError as error:
            if strict:
                raise
            report.skip(error)
            continue
        yield number, record


def _surrogate_field(value, prefix: str = "") -> str | None:
    """Path (``a.b[2].c``) of the first string holding undecodable bytes."""
    if isinstance(value, str):
        return prefix if _has_surrogates(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _surrogate_field(item, f"{prefix}.{key}" if prefix else str(key))
            if found:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _surrogate_field(item, f"{prefix}[{i}]")
            if found:
                return found
    return None


def _read_json_lines(path, strict, parse_line) -> tuple[list[Dialogue], ReadReport]:
    path = Path(path)
    report = ReadReport(str(path))
    dialogues = []
    for number, record in _iter_json_lines(path, strict, report):
        try:
            dialogue = parse_line(path, number, record)
        except DataError as error:
            if strict:
                raise
            report.skip(error)
            continue
        report.records_read += 1
        dialogues.append(dialogue)
    return _finish(report, dialogues)


def _get(record: dict, path, line, field, prefix=""):
    if field not in record or record[field] is None:
        raise DataError(path, line, prefix + field, MISSING_FIELD, "missing")
    return record[field]


def _get_list(record, path, line, field) -> list:
    value = _get(record, path, line, field)
    if not isinstance(value, list) or not value:
        raise DataError(path, line, field, BAD_VALUE, "expected a non-empty list")
    return value


def read_esconv(path: str | Path, emotion_map: Mapping[str, str] | None = None, strict: bool = True,
                supporter_emotion: str = "neutral") -> tuple[list[Dialogue], ReadReport]:
    """ESConv JSON Lines (train.txt / valid.txt / test.txt), one dialogue per line.

    ESConv has one seeker emotion per dialogue (``emotion_type``) and none for the supporter: every seeker
    utterance gets ``emotion_map[emotion_type]`` (default ``DEFAULT_ESCONV_EMOTION_MAP``), every supporter
    utterance ``supporter_emotion``. Strategies are kept (None where a supporter row has none).
    ``dialogue_id`` is ``"<file stem>:<line>"``.
    """
    emotion_map = dict(DEFAULT_ESCONV_EMOTION_MAP if emotion_map is None else emotion_map)
    for key, label in emotion_map.items():
        if label not in _EMOTION_SET:
            raise ValueError(f"emotion_map[{key!r}] = {label!r} is not one of {EMOTIONS}")
    if supporter_emotion not in _EMOTION_SET:
        raise ValueError(f"supporter_emotion {supporter_emotion!r} is not one of {EMOTIONS}")
    lookup = {k.strip().lower(): v for k, v in emotion_map.items()}

    def parse(path, line, record):
        raw_emotion = _get(record, path, line, "emotion_type")
        key = str(raw_emotion).strip().lower()
        if key not in lookup:
            raise DataError(path, line, "emotion_type", UNKNOWN_EMOTION,
                            f"ESConv emotion {raw_emotion!r} has no entry in the emotion map {sorted(lookup)}")
        problem = _check_text(path, line, "problem_type", record.get("problem_type"))
        utterances = []
        for i, turn in enumerate(_get_list(record, path, line, "dialog")):
            where = f"dialog[{i}]."
            if not isinstance(turn, dict):
                raise DataError(path, line, where[:-1], BAD_VALUE, "expected an object")
            speaker_raw = _get(turn, path, line, "speaker", where)
            speaker = ESCONV_SPEAKERS.get(str(speaker_raw).strip().lower())
            if speaker is None:
                raise DataError(path, line, where + "speaker", UNKNOWN_SPEAKER,
                                f"unknown speaker {speaker_raw!r}; expected usr or sys")
            text = _check_text(path, line, where + "text", turn.get("text"))
            if speaker == "client":
                utterances.append(Utterance(speaker, text, lookup[key], None, line))
            else:
                strategy = _check_strategy(path, line, where + "strategy", turn.get("strategy"), ESCONV_STRATEGIES)
                utterances.append(Utterance(speaker, text, supporter_emotion, strategy, line))
        return Dialogue(f"{Path(path).stem}:{line}", problem, tuple(utterances), "esconv")

    return _read_json_lines(path, strict, parse)


def read_jsonl(path: str | Path, strict: bool = True) -> tuple[list[Dialogue], ReadReport]:
    """The project's own JSON Lines schema (data/SCHEMA.md): one dialogue per line,
    ``{"dialogue_id", "problem_type", "utterances": [{"speaker", "text", "emotion", "strategy"?}]}``."""

    def parse(path, line, record):
        dialogue_id = record.get("dialogue_id")
        if dialogue_id is None or not str(dialogue_id).strip():
            raise DataError(path, line, "dialogue_id", MISSING_FIELD, "missing")
        problem = _check_text(path, line, "problem_type", record.get("problem_type"))
        utterances = []
        for i, turn in enumerate(_get_list(record, path, line, "utterances")):
            where = f"utterances[{i}]."
            if not isinstance(turn, dict):
                raise DataError(path, line, where[:-1], BAD_VALUE, "expected an object")
            speaker_raw = _get(turn, path, line, "speaker", where)
            speaker = str(speaker_raw).strip().lower()
            if speaker not in SPEAKERS:
                raise DataError(path, line, where + "speaker", UNKNOWN_SPEAKER,
                                f"unknown speaker {speaker_raw!r}; expected one of {SPEAKERS}")
            text = _check_text(path, line, where + "text", turn.get("text"))
            emotion = _check_emotion(path, line, where + "emotion", turn.get("emotion"))
            strategy = None
            if speaker == "therapist":
                strategy = _check_strategy(path, line, where + "strategy", turn.get("strategy"), None)
            utterances.append(Utterance(speaker, text, emotion, strategy, line))
        source = record.get("source", "jsonl")
        return Dialogue(str(dialogue_id).strip(), problem, tuple(utterances), str(source))

    return _read_json_lines(path, strict, parse)


def dialogue_to_json(dialogue: Dialogue) -> dict:
    """One line of the project's JSONL schema."""
    return {
        "dialogue_id": dialogue.dialogue_id,
        "problem_type": dialogue.problem_type,
        "source": dialogue.source,
        "utterances": [{"speaker": u.speaker, "text": u.text, "emotion": u.emotion, "strategy": u.strategy}
                       for u in dialogue.utterances],
    }


def write_jsonl(dialogues: Iterable[Dialogue], path: str | Path) -> int:
    """Write dialogues in the project's JSONL schema (e.g. to convert any source once); returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for dialogue in dialogues:
            out.write(json.dumps(dialogue_to_json(dialogue), ensure_ascii=False) + "\n")
            count += 1
    return count


_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


def normalise_split(split: str) -> str:
    """"validation" / "valid" / "dev" -> "val"; others unchanged."""
    return _SPLIT_ALIASES.get(split, split)

