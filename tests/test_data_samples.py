"""Dialogues -> samples: the turn rules on a hand-built dialogue, options, and the counts on real MESC."""

import dataclasses

import pytest

from therapy_rl.data import sources
from therapy_rl.data.samples import SampleOptions, build_samples, build_samples_with_report, to_hf_dataset
from therapy_rl.data.sources import Dialogue, Utterance


def _u(speaker, text, emotion="neutral", strategy=None):
    return Utterance(speaker, text, emotion, strategy if speaker == "therapist" else None, 1)


# index: 0 T, 1 C, 2 C, 3 T, 4 T, 5 C, 6 T, 7 C
DIALOGUE = Dialogue("demo", "grief", (
    _u("therapist", "Welcome.", "neutral", "Others"),
    _u("client", "My dog died.", "sadness"),
    _u("client", "I'm so angry at the vet.", "anger"),
    _u("therapist", "I'm sorry.", "sadness", "Communication Skills"),
    _u("therapist", "What happened?", "neutral", "Open question"),
    _u("client", "She missed the signs.", "fear"),
    _u("therapist", "That sounds awful.", "neutral", "Restatement"),
    _u("client", "Bye.", "neutral"),
), "test")


def test_turn_rules_default():
    samples, report = build_samples_with_report([DIALOGUE])
    assert [(s.user_text, s.user_emotion, s.therapist_text, s.therapist_emotion, s.strategy, s.turn_index)
            for s in samples] == [
        ("My dog died. I'm so angry at the vet.", "anger", "I'm sorry.", "sadness", "Communication Skills", 3),
        ("She missed the signs.", "fear", "That sounds awful.", "neutral", "Restatement", 6),
    ]
    assert all(s.context == () and s.problem == "grief" and s.dialogue_id == "demo" for s in samples)
    assert dataclasses.asdict(report) == dict(dialogues=1, samples=2, therapist_utterances=4,
                                              therapist_without_client=1, therapist_run_continuations=1,
                                              trailing_client_runs=1)


def test_user_emotion_first_and_merged_therapist_run():
    samples = build_samples([DIALOGUE], SampleOptions(user_emotion_from="first", therapist_run="merge"))
    assert samples[0].user_emotion == "sadness"
    assert samples[0].therapist_text == "I'm sorry. What happened?"
    assert (samples[0].therapist_emotion, samples[0].strategy) == ("sadness", "Communication Skills")
    assert samples[1].therapist_text == "That sounds awful."


def test_context_window():
    samples = build_samples([DIALOGUE], SampleOptions(context_turns=2))
    assert samples[0].context == (("therapist", "Welcome."),)
    assert samples[1].context == (("client", "My dog died. I'm so angry at the vet."),
                                  ("therapist", "I'm sorry. What happened?"))
    wide = build_samples([DIALOGUE], SampleOptions(context_turns=10))
    assert len(wide[1].context) == 3 and wide[1].context[0] == ("therapist", "Welcome.")


def test_options_are_validated():
    with pytest.raises(ValueError, match="user_emotion_from"):
        SampleOptions(user_emotion_from="middle")
    with pytest.raises(ValueError, match="therapist_run"):
        SampleOptions(therapist_run="all")
    with pytest.raises(ValueError, match="context_turns"):
        SampleOptions(context_turns=-1)


def _count_answered_runs(dialogues):
    """Reference: a sample for every client utterance directly followed by a therapist utterance."""
    return sum(1 for d in dialogues for a, b in zip(d.utterances, d.utterances[1:])
               if a.speaker == "client" and b.speaker == "therapist")


def test_bundled_sample_counts():
    for split in sources.MESC_SPLITS:
        dialogues, _ = sources.read_bundled_sample(split)
        samples, report = build_samples_with_report(dialogues)
        assert len(samples) == report.samples == _count_answered_runs(dialogues) > 0
        therapist = sum(u.speaker == "therapist" for d in dialogues for u in d.utterances)
        assert report.therapist_utterances == therapist == (
            report.samples + report.therapist_without_client + report.therapist_run_continuations)


def test_mesc_sample_counts_match_paper(data_dir):
    paper = {"train": 3721, "val": 445, "test": 454}  # Zhang & Ive, from their MESC preprocessing
    for split, expected in paper.items():
        dialogues, _ = sources.read_mesc(data_dir, split)
        for opts in (SampleOptions(), SampleOptions(therapist_run="merge", user_emotion_from="first")):
            assert len(build_samples(dialogues, opts)) == expected


def test_to_hf_dataset():
    samples = build_samples([DIALOGUE], SampleOptions(context_turns=1))
    dataset = to_hf_dataset(samples)
    assert len(dataset) == 2
    assert dataset[1]["user_text"] == samples[1].user_text
    assert dataset[1]["context"] == [["therapist", "I'm sorry. What happened?"]]
