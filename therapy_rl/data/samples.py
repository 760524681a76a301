"""Dialogues -> emotion-conditioned training samples: one sample per therapist reply to a client.

Turn rules (see data/SCHEMA.md; they reproduce the paper's 3,721 / 445 / 454 MESC samples):
- a run of consecutive client utterances is joined (with spaces) into one user text; its user emotion is the
  run's last utterance's emotion (``user_emotion_from="last"``, the paper at RL/eval) or first (the paper's SFT);
- the first therapist utterance after a client run is the sample's therapist turn (text, emotion, strategy);
  with ``therapist_run="merge"`` the whole therapist run is joined instead (emotion and strategy stay those
  of its first utterance);
- therapist utterances with no client run before them (a dialogue opening with the therapist, or the rest of
  a therapist run under "first") give no sample; they are counted in ``SampleReport`` and still appear in the
  context of later samples; a trailing client run with no reply gives none either.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from therapy_rl.data.labels import EMOTION_TO_INDEX
from therapy_rl.data.sources import Dialogue, Utterance

USER_EMOTION_CHOICES = ("first", "last")
THERAPIST_RUN_CHOICES = ("first", "merge")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    include_therapist_emotion: bool = True  # False = the paper's "SFT (no emotion)" ablation
    include_strategy: bool = False  # <therapist><strategy>{strategy} before the therapist text
    context_turns: int = 0  # k previous speaker turns as <context> (0 = the paper's format)
    user_emotion_from: str = "last"  # "first" | "last" utterance of the client run
    therapist_run: str = "first"  # "first" utterance of a therapist run (the paper) | "merge" the run

    def __post_init__(self):
        if self.user_emotion_from not in USER_EMOTION_CHOICES:
            raise ValueError(f"user_emotion_from must be one of {USER_EMOTION_CHOICES}, got {self.user_emotion_from!r}")
        if self.therapist_run not in THERAPIST_RUN_CHOICES:
            raise ValueError(f"therapist_run must be one of {THERAPIST_RUN_CHOICES}, got {self.therapist_run!r}")
        if self.context_turns < 0:
            raise ValueError(f"context_turns must be >= 0, got {self.context_turns}")


@dataclasses.dataclass(frozen=True)
class Sample:
    problem: str
    user_text: str
    user_emotion: str
    therapist_text: str
    therapist_emotion: str
    strategy: str | None
    context: tuple[tuple[str, str], ...]  # up to k earlier turns, oldest first: ("client" | "therapist", text)
    dialogue_id: str
    turn_index: int  # index in dialogue.utterances of the (first) therapist utterance of this sample

    @property
    def user_emotion_index(self) -> int:
        return EMOTION_TO_INDEX[self.user_emotion]

    @property
    def therapist_emotion_index(self) -> int:
        return EMOTION_TO_INDEX[self.therapist_emotion]


@dataclasses.dataclass
class SampleReport:
    dialogues: int = 0
    samples: int = 0
    therapist_utterances: int = 0
    therapist_without_client: int = 0  # therapist utterances before a dialogue's first client run: no sample
    therapist_run_continuations: int = 0  # later utterances of an answering run: dropped ("first") or merged
    trailing_client_runs: int = 0  # client runs at a dialogue's end, with no reply

    def summary(self) -> str:
        return (f"{self.samples} samples from {self.dialogues} dialogues; therapist utterances "
                f"{self.therapist_utterances}: {self.therapist_without_client} open a dialogue, "
                f"{self.therapist_run_continuations} continue a therapist run; "
                f"{self.trailing_client_runs} trailing client runs")


def _runs(utterances: Sequence[Utterance]) -> list[tuple[int, list[Utterance]]]:
    """Maximal same-speaker runs as (index of the first utterance, utterances)."""
    runs: list[tuple[int, list[Utterance]]] = []
    for i, utterance in enumerate(utterances):
        if runs and runs[-1][1][0].speaker == utterance.speaker:
            runs[-1][1].append(utterance)
        else:
            runs.append((i, [utterance]))
    return runs


def _join(utterances: Sequence[Utterance]) -> str:
    return " ".join(u.text for u in utterances)


def build_samples_with_report(dialogues: Sequence[Dialogue],
                              opts: SampleOptions = SampleOptions()) -> tuple[list[Sample], SampleReport]:
    report = SampleReport(dialogues=len(dialogues))
    samples: list[Sample] = []
    for dialogue in dialogues:
        runs = _runs(dialogue.utterances)
        history: list[tuple[str, str]] = []  # every earlier run, as (speaker, joined text)
        for r, (start, run) in enumerate(runs):
            speaker = run[0].speaker
            if speaker == "therapist":
                report.therapist_utterances += len(run)
                if r == 0:
                    report.therapist_without_client += len(run)
                else:
                    report.therapist_run_continuations += len(run) - 1
                    client_run = runs[r - 1][1]
                    first = run[0]
                    emotion_source = client_run[-1] if opts.user_emotion_from == "last" else client_run[0]
                    # history[-1] is the client run itself; context is what came before it
                    context = tuple(history[:-1][-opts.context_turns:]) if opts.context_turns else ()
                    samples.append(Sample(
                        problem=dialogue.problem_type,
                        user_text=_join(client_run),
                        user_emotion=emotion_source.emotion,
                        therapist_text=first.text if opts.therapist_run == "first" else _join(run),
                        therapist_emotion=first.emotion,
                        strategy=first.strategy,
                        context=context,
                        dialogue_id=dialogue.dialogue_id,
                        turn_index=start,
                    ))
            elif r == len(runs) - 1:
                report.trailing_client_runs += 1
            history.append((speaker, _join(run)))
    report.samples = len(samples)
    return samples, report


def build_samples(dialogues: Sequence[Dialogue], opts: SampleOptions = SampleOptions()) -> list[Sample]:
    """One sample per client run answered by the therapist (rules in the module docstring)."""
    return build_samples_with_report(dialogues, opts)[0]


def sample_to_dict(sample: Sample) -> dict:
    out = dataclasses.asdict(sample)
    out["context"] = [list(turn) for turn in sample.context]
    return out


def to_hf_dataset(samples: Sequence[Sample]):
    """A ``datasets.Dataset`` with one row per sample (context as [speaker, text] pairs), e.g. for ``.map``
    with caching or for sharing; ``datasets`` is imported only here."""
    import datasets

    return datasets.Dataset.from_list([sample_to_dict(s) for s in samples])
