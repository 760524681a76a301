"""Readers: MESC split sizes on the real data, ESConv mapping, the project's JSONL, the bundled sample, and every
kind of bad record in strict and lenient mode (the message must name file, line and field)."""

import collections
import csv
import json
import os
from pathlib import Path

import pytest

from therapy_rl.data import labels, sources
from therapy_rl.data.sources import DataError

HEADER = "Utterance,Speaker,Emotion,Strategy,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
GOOD_ROWS = [
    "I can't sleep.,Client,fear,undefined,0,0,,,,\n",
    "What keeps you up?,Therapist,neutral,Open question,0,1,,,,\n",
    "Work mostly.,Client,sadness,undefined,0,2,,,,\n",
    "Tell me more.,Therapist,neutral,open question,0,3,,,,\n",
    "Hello again.,Client,neutral,undefined,1,0,,,,\n",
    "Welcome back.,Therapist,joy,Approval,1,1,,,,\n",
]


def _write_csv(tmp_path: Path, bad_row: bytes, position: int = 2) -> Path:
    """MESC.csv with GOOD_ROWS and ``bad_row`` inserted before GOOD_ROWS[position] (file line position + 2)."""
    rows = [r.encode() for r in GOOD_ROWS]
    rows.insert(position, bad_row)
    path = tmp_path / "MESC.csv"
    path.write_bytes(HEADER.encode() + b"".join(rows))
    return path


# (kind, bad CSV row, field named in the error, reason)
CSV_CASES = [
    ("missing_field", b"Oops.,Client,,undefined,0,9,,,,\n", "Emotion", sources.MISSING_FIELD),
    ("missing_id", b"Oops.,Client,fear,undefined,,9,,,,\n", "Dialogue_ID", sources.MISSING_FIELD),
    ("unknown_emotion", b"Oops.,Client,grumpy,undefined,0,9,,,,\n", "Emotion", sources.UNKNOWN_EMOTION),
    ("empty_text", b"   ,Client,fear,undefined,0,9,,,,\n", "Utterance", sources.EMPTY_TEXT),
    ("unknown_speaker", b"Oops.,Narrator,fear,undefined,0,9,,,,\n", "Speaker", sources.UNKNOWN_SPEAKER),
    ("unknown_strategy", b"Oops.,Therapist,neutral,Hypnosis,0,9,,,,\n", "Strategy", sources.UNKNOWN_STRATEGY),
    ("bad_id", b"Oops.,Client,fear,undefined,0,nine,,,,\n", "Utterance_ID", sources.BAD_VALUE),
    ("too_few_cells", b"Oops.,Client,fear\n", "<row>", sources.BROKEN_CSV),
    ("bad_quote", b'"Oops"x,Client,fear,undefined,0,9,,,,\n', "<row>", sources.BROKEN_CSV),
    ("bad_utf8", b"Caf\xe9 talk,Client,fear,undefined,0,9,,,,\n", "Utterance", sources.BAD_UTF8),
    ("duplicate_id", b"Again.,Client,fear,undefined,0,1,,,,\n", "Utterance_ID", sources.BAD_VALUE),
]


@pytest.mark.parametrize("kind,row,field,reason", CSV_CASES, ids=[c[0] for c in CSV_CASES])
def test_mesc_csv_bad_record_strict(tmp_path, kind, row, field, reason):
    path = _write_csv(tmp_path, row)
    with pytest.raises(DataError) as info:
        sources.read_mesc(tmp_path, "train", strict=True)
    error = info.value
    assert error.reason == reason and error.field == field and error.line == 4
    message = str(error)
    assert str(path) in message and ":4:" in message and repr(field) in message


@pytest.mark.parametrize("kind,row,field,reason", CSV_CASES, ids=[c[0] for c in CSV_CASES])
def test_mesc_csv_bad_record_lenient(tmp_path, kind, row, field, reason):
    path = _write_csv(tmp_path, row)
    dialogues, report = sources.read_mesc(tmp_path, "train", strict=False)
    assert report.skipped == {reason: 1}
    assert report.records_read == len(GOOD_ROWS)
    assert f"{path}:4:" in report.messages[0]
    texts = [u.text for d in dialogues for u in d.utterances]
    assert texts == [r.split(",")[0] for r in GOOD_ROWS]  # every good row kept, in order
    assert report.dialogues == 2 and report.utterances == len(GOOD_ROWS)


def test_mesc_csv_multiline_row_and_canonical_strategy(tmp_path):
    path = tmp_path / "MESC.csv"
    path.write_text(HEADER + '"First line\nsecond line",Client,FEAR,undefined,0,0,,,,\n'
                    + "Okay.,Therapist,neutral,open question,0,1,,,,\n", encoding="utf-8")
    (dialogue,), report = sources.read_mesc(tmp_path, "train")
    first, second = dialogue.utterances
    assert first.text == "First line second line" and first.emotion == "fear" and first.line == 2
    assert second.line == 4 and second.strategy == "Open question" and first.strategy is None
    assert dialogue.problem_type == "unknown" and dialogue.source == "mesc"


def test_mesc_csv_missing_column_always_raises(tmp_path):
    (tmp_path / "MESC.csv").write_text("Utterance,Speaker,Strategy,Dialogue_ID,Utterance_ID\nHi,Client,x,0,0\n")
    with pytest.raises(DataError, match=r"MESC.csv:1: field 'Emotion'"):
        sources.read_mesc(tmp_path, "train", strict=False)


def test_mesc_split_assignment_on_synthetic_ids(tmp_path):
    rows = [f"Hi {d}.,Client,neutral,undefined,{d},0,,,,\n" for d in (0, 3, 10, 25, 23)]
    (tmp_path / "MESC.csv").write_text(HEADER + "".join(rows))
    ids = {split: [d.dialogue_id for d in sources.read_mesc(tmp_path, split)[0]] for split in sources.MESC_SPLITS}
    assert ids == {"train": ["0"], "val": ["3", "25"], "test": ["10", "23"]}


def test_split_id_constants_are_disjoint():
    assert len(sources.MESC_VAL_IDS) == len(set(sources.MESC_VAL_IDS)) == 102
    assert len(sources.MESC_TEST_IDS) == len(set(sources.MESC_TEST_IDS)) == 102
    assert not set(sources.MESC_VAL_IDS) & set(sources.MESC_TEST_IDS)


# ---------------------------------------------------------------- real MESC / ESConv


def _reference_mesc(data_dir):
    """Dialogue_ID -> rows, read with the csv module alone."""
    by_id = collections.defaultdict(list)
    with open(os.path.join(data_dir, "mesc", "MESC.csv"), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_id[int(row["Dialogue_ID"])].append(row)
    return by_id


def test_mesc_official_split_sizes(data_dir):
    reference = _reference_mesc(data_dir)
    seen = set()
    for split, expected in (("train", 815), ("val", 102), ("test", 102)):
        dialogues, report = sources.read_mesc(data_dir, split)
        assert len(dialogues) == expected == report.dialogues
        assert report.records_skipped == 0 and report.records_read == 28762
        ids = {int(d.dialogue_id) for d in dialogues}
        assert not ids & seen
        seen |= ids
        for d in dialogues:
            rows = reference[int(d.dialogue_id)]
            assert [u.text for u in d.utterances] == [" ".join(r["Utterance"].split()) for r in rows]
            assert [u.emotion for u in d.utterances] == [r["Emotion"] for r in rows]
            assert [u.speaker for u in d.utterances] == [r["Speaker"].lower() for r in rows]
            assert d.problem_type == "unknown"
    assert seen == set(reference) and len(seen) == 1019
    val_ids = [int(d.dialogue_id) for d in sources.read_mesc(data_dir, "val")[0]]
    assert set(val_ids) == set(sources.MESC_VAL_IDS)


def test_mesc_problem_types_from_json(data_dir):
    dialogues, _ = sources.read_mesc(data_dir, "val", problem_types="json")
    with open(os.path.join(data_dir, "mesc", "val.json"), encoding="utf-8") as f:
        records = json.load(f)
    expected = {str(i): " ".join(r["problem_type"].split()) for i, r in zip(sources.MESC_VAL_IDS, records)}
    assert {d.dialogue_id: d.problem_type for d in dialogues} == expected
    train, _ = sources.read_mesc(data_dir, "train", problem_types="json")
    assert {d.problem_type for d in train} == {"unknown"}


def test_esconv_reader_maps_emotions(data_dir):
    path = os.path.join(data_dir, "esconv", "valid.txt")
    dialogues, report = sources.read_esconv(path)
    assert len(dialogues) == 195 and report.records_skipped == 0
    with open(path, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    for dialogue, record in zip(dialogues, raw):
        assert len(dialogue.utterances) == len(record["dialog"])
        for u, turn in zip(dialogue.utterances, record["dialog"]):
            if turn["speaker"] == "usr":
                assert u.speaker == "client" and u.strategy is None
                assert u.emotion == sources.DEFAULT_ESCONV_EMOTION_MAP[record["emotion_type"]]
            else:
                assert u.speaker == "therapist" and u.emotion == "neutral" and u.strategy == turn.get("strategy")
    custom = {k: "anger" for k in sources.DEFAULT_ESCONV_EMOTION_MAP}
    other, _ = sources.read_esconv(path, emotion_map=custom, supporter_emotion="joy")
    assert {u.emotion for d in other for u in d.utterances} == {"anger", "joy"}


def test_esconv_sizes(data_dir):
    sizes = [len(sources.read_esconv(os.path.join(data_dir, "esconv", f"{n}.txt"))[0])
             for n in ("train", "valid", "test")]
    assert sizes == [910, 195, 195]


# ---------------------------------------------------------------- JSON Lines: ESConv schema errors


def _esconv_line(**changes):
    record = {"emotion_type": "anxiety", "problem_type": "job crisis",
              "dialog": [{"text": "Hi.", "speaker": "usr"}, {"text": "Hello.", "speaker": "sys", "strategy": "Question"}]}
    record.update(changes)
    return json.dumps(record)


@pytest.mark.parametrize("line,field,reason", [
    (_esconv_line(emotion_type="boredom"), "emotion_type", sources.UNKNOWN_EMOTION),
    (_esconv_line(dialog=[{"text": "Hi.", "speaker": "bot"}]), "dialog[0].speaker", sources.UNKNOWN_SPEAKER),
    (_esconv_line(dialog=[{"text": " ", "speaker": "usr"}]), "dialog[0].text", sources.EMPTY_TEXT),
    (_esconv_line(dialog=[{"speaker": "usr"}]), "dialog[0].text", sources.MISSING_FIELD),
    (_esconv_line(dialog=[{"text": "x", "speaker": "sys", "strategy": "Magic"}]), "dialog[0].strategy",
     sources.UNKNOWN_STRATEGY),
])
def test_esconv_bad_records(tmp_path, line, field, reason):
    path = tmp_path / "valid.txt"
    path.write_text(_esconv_line() + "\n" + line + "\n" + _esconv_line() + "\n")
    with pytest.raises(DataError) as info:
        sources.read_esconv(path)
    assert (info.value.line, info.value.field, info.value.reason) == (2, field, reason)
    assert f"{path}:2: field {field!r}" in str(info.value)
    dialogues, report = sources.read_esconv(path, strict=False)
    assert [d.dialogue_id for d in dialogues] == ["valid:1", "valid:3"] and report.skipped == {reason: 1}


# ---------------------------------------------------------------- the project's JSONL


def _jsonl_record(dialogue_id="d1", **utterance_changes):
    turns = [{"speaker": "client", "text": "I feel stuck.", "emotion": "sadness"},
             {"speaker": "therapist", "text": "Stuck how?", "emotion": "neutral", "strategy": "Open question"}]
    turns[0].update(utterance_changes)
    turns[0] = {k: v for k, v in turns[0].items() if v is not None}
    return {"dialogue_id": dialogue_id, "problem_type": "work", "utterances": turns}


JSONL_CASES = [
    ("missing_field", json.dumps(_jsonl_record(emotion=None)).encode(), "utterances[0].emotion", sources.MISSING_FIELD),
    ("missing_top", json.dumps({"dialogue_id": "x", "utterances": []}).encode(), "problem_type", sources.MISSING_FIELD),
    ("unknown_emotion", json.dumps(_jsonl_record(emotion="meh")).encode(), "utterances[0].emotion",
     sources.UNKNOWN_EMOTION),
    ("empty_text", json.dumps(_jsonl_record(text="  \n ")).encode(), "utterances[0].text", sources.EMPTY_TEXT),
    ("unknown_speaker", json.dumps(_jsonl_record(speaker="coach")).encode(), "utterances[0].speaker",
     sources.UNKNOWN_SPEAKER),
    ("broken_json", b'{"dialogue_id": "d9", "problem_type": ', "<line>", sources.BROKEN_JSON),
    ("not_an_object", b"[1, 2, 3]", "<line>", sources.BROKEN_JSON),
    ("bad_utf8", json.dumps(_jsonl_record(text="caf_")).encode().replace(b"caf_", b"caf\xe9"),
     "utterances[0].text", sources.BAD_UTF8),
]


@pytest.mark.parametrize("kind,line,field,reason", JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_jsonl_bad_record(tmp_path, kind, line, field, reason):
    path = tmp_path / "own.jsonl"
    good = [json.dumps(_jsonl_record(f"d{i}")).encode() for i in range(3)]
    path.write_bytes(b"\n".join([good[0], b"", line, good[1], good[2]]) + b"\n")  # bad record on line 3
    with pytest.raises(DataError) as info:
        sources.read_jsonl(path, strict=True)
    assert (info.value.line, info.value.field, info.value.reason) == (3, field, reason)
    assert str(info.value).startswith(f"{path}:3: field {field!r}")
    dialogues, report = sources.read_jsonl(path, strict=False)
    assert [d.dialogue_id for d in dialogues] == ["d0", "d1", "d2"]
    assert report.skipped == {reason: 1} and report.records_read == 3 and report.records_skipped == 1
    assert [u.line for u in dialogues[1].utterances] == [4, 4]


def test_jsonl_round_trip(tmp_path):
    dialogues, _ = sources.read_bundled_sample("val")
    path = tmp_path / "out.jsonl"
    assert sources.write_jsonl(dialogues, path) == len(dialogues)
    back, report = sources.read_jsonl(path)
    strip = lambda ds: [(d.dialogue_id, d.problem_type, d.source,  # noqa: E731
                         [(u.speaker, u.text, u.emotion, u.strategy) for u in d.utterances]) for d in ds]
    assert strip(back) == strip(dialogues) and report.records_read == len(dialogues)


# ---------------------------------------------------------------- bundled sample


def test_bundled_sample():
    splits = {s: sources.read_bundled_sample(s)[0] for s in sources.MESC_SPLITS}
    ids = [d.dialogue_id for ds in splits.values() for d in ds]
    assert len(ids) == len(set(ids)) == 36
    assert [len(splits[s]) for s in sources.MESC_SPLITS] == [30, 3, 3]
    utterances = [u for ds in splits.values() for d in ds for u in d.utterances]
    assert 400 <= len(utterances) <= 600
    assert {u.emotion for u in utterances if u.speaker == "client"} == set(labels.EMOTIONS)
    therapist = [u for u in utterances if u.speaker == "therapist"]
    assert all(u.strategy in labels.MESC_STRATEGIES for u in therapist)
    assert sum(u.emotion == "neutral" for u in therapist) / len(therapist) > 0.9
    assert len({d.problem_type for ds in splits.values() for d in ds}) >= 10
    crisis = [d for ds in splits.values() for d in ds if "suicid" in d.problem_type.lower()]
    assert {d.dialogue_id for d in crisis} & {d.dialogue_id for d in splits["train"]}
    for d in crisis:
        therapist_text = " ".join(u.text for u in d.utterances if u.speaker == "therapist")
        assert "988" in therapist_text and "emergency" in therapist_text


def test_bundled_sample_matches_raw_csv():
    with open(sources.SAMPLE_DIR / "dialogues.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    dialogues = [d for s in sources.MESC_SPLITS for d in sources.read_bundled_sample(s)[0]]
    assert sum(len(d.utterances) for d in dialogues) == len(rows)
    assert list(rows[0].keys()) == HEADER.strip().split(",")
