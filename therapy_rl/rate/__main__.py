"""`python -m therapy_rl.rate COMMAND --workdir W`: the rating app and its offline jobs.

    serve [--host 127.0.0.1] [--port 8765]   the rating web app over W/ratings.sqlite
    add-rater NAME                           registers a rater and prints its token (shown once)
    list-raters                              the registered raters
    report [--json PATH]                     Krippendorff's alpha and per-rater score distributions
    train-rm [--out DIR] [--heldout 0.2]     fits the learned human reward (default DIR: W/reward_model)
    export-unsafe [--out PATH]               replies flagged unsafe, as guard training data (W/unsafe_replies.jsonl)

W is the PPO run's workdir (reward.kind = human keeps its store there) or any folder. A user error prints one
line `error: ...` and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from therapy_rl.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m therapy_rl.rate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--workdir", required=True, help="folder of ratings.sqlite (the PPO run's workdir)")
        return sub

    serve = command("serve", "run the rating web app")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8765, help="port (0 = any free one; the address is printed)")
    add = command("add-rater", "register a rater and print its token")
    add.add_argument("name")
    command("list-raters", "list the registered raters")
    report = command("report", "rater agreement and score distributions")
    report.add_argument("--json", default="", help="also write the report here (default W/rating_report.json)")
    train = command("train-rm", "fit the learned human reward model")
    train.add_argument("--out", default="", help="output folder (default W/reward_model)")
    train.add_argument("--heldout", type=float, default=0.2, help="share of rated replies held out for the report")
    train.add_argument("--seed", type=int, default=0)
    export = command("export-unsafe", "write the replies raters flagged unsafe as JSON Lines")
    export.add_argument("--out", default="", help="output file (default W/unsafe_replies.jsonl)")
    return parser


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def run(argv=None) -> int:
    args = _parser().parse_args(argv)
    from therapy_rl.rate import store as store_lib

    if args.command == "serve":
        from therapy_rl.rate import server
        server.serve(args.workdir, args.host, args.port)
        return 0
    if args.command != "add-rater" and not os.path.isfile(store_lib.store_path(args.workdir)):
        raise UserError(f"{store_lib.store_path(args.workdir)}: no rating store (add a rater or serve first)")
    store = store_lib.RatingStore.in_workdir(args.workdir)
    if args.command == "add-rater":
        token = store.add_rater(args.name)
        print(f"rater {args.name!r} added to {store.path}; token (shown once, keep it secret):")
        print(token)
        print(f"rating page: http://127.0.0.1:8765/?token={token}")
    elif args.command == "list-raters":
        for rater in store.raters():
            print(f"{rater.id}\t{rater.name}\t{store.count_ratings(rater)} ratings")
    elif args.command == "report":
        from therapy_rl.rate import agreement

        report = agreement.agreement_report(store.ratings())
        print(agreement.format_report(report))
        path = args.json or os.path.join(args.workdir, "rating_report.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(agreement.json_safe(report), f, indent=1)
        print(f"written to {path}")
    elif args.command == "train-rm":
        from therapy_rl.rate import reward_model

        out = args.out or os.path.join(args.workdir, "reward_model")
        report = reward_model.train_reward_model(store, out, heldout_fraction=args.heldout, seed=args.seed)
        held = report["heldout"]
        print(f"fitted on {report['num_replies']} rated replies ({report['num_ratings']} ratings), alpha "
              f"{report['alpha']}; held-out {report['num_heldout']}:")
        print(f"  Spearman: model {_fmt(held['spearman_model'])}, length baseline "
              f"{_fmt(held['spearman_length_baseline'])}, mean baseline n/a (constant)")
        print(f"  MAE:      model {_fmt(held['mae_model'])}, mean baseline {_fmt(held['mae_mean_baseline'])}")
        print(f"model {report['model']}; use it with --config.reward.kind=learned_human "
              f"--config.reward.learned_human.model_path={report['model']}")
    elif args.command == "export-unsafe":
        from therapy_rl.rate import unsafe

        out = args.out or os.path.join(args.workdir, "unsafe_replies.jsonl")
        print(f"{unsafe.export_unsafe(store, out)} unsafe replies written to {out}")
    return 0


def main() -> None:
    try:
        sys.exit(run())
    except UserError as e:
        if os.environ.get("THERAPY_RL_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
