"""How often the reply guard flags real therapist replies (MESC validation): read alone, as the jitted reward reads a
reply, and after the user's message, as chat and the API read it.

    python tools/guard_on_references.py            # $THERAPY_RL_DATA set; about a minute on 2 cores
"""
from __future__ import annotations

import argparse

from therapy_rl import defaults, guard
from therapy_rl.data import pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--show", type=int, default=8, help="flagged replies to print")
    args = parser.parse_args()
    samples = pipeline.load_samples(defaults.config_file("sft_mesc").data, (args.split,))[args.split]
    alone = [s for s in samples if guard.check(s.therapist_text, "reply").harmful]
    in_context = [s for s in samples
                  if guard.check(s.therapist_text, "reply", [("client", s.user_text)]).harmful]
    print(f"MESC {args.split}: {len(samples)} therapist replies; flagged read alone: {len(alone)} "
          f"({len(alone) / len(samples):.1%}); flagged after the user's message: {len(in_context)}")
    for s in alone[:args.show]:
        print(f"  {s.therapist_text!r}")


if __name__ == "__main__":
    main()
