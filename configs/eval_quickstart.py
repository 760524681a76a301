"""Evaluate a quickstart run on the bundled sample's test split, fast: a 4-setting decoding search on the validation
split first, no BERTScore.

    python -m therapy_rl.main --config configs/quickstart.py --workdir /tmp/qs
    python -m therapy_rl.main --config configs/eval_quickstart.py --workdir /tmp/qs_eval --config.checkpoint=/tmp/qs
"""

from therapy_rl import defaults


def get_config():
    config = defaults.eval_defaults()
    config.split = "test"
    config.eval_batch_size = 16
    config.sampling.max_new_tokens = 32  # the quickstart model has 256 positions and 64-token prompts
    config.metrics.bertscore = False  # MiniLM token states are slow on CPU; turn on for the full metric set
    config.metrics.bootstrap_resamples = 1000
    config.decoding_search.enabled = True
    config.decoding_search.limit = 0  # all 17 validation prompts
    config.decoding_search.top_p = (0.9, 1.0)  # a small grid; the paper's is in defaults.eval_defaults()
    config.decoding_search.top_k = (0, 20)
    config.decoding_search.temperature = (1.0,)
    config.report.paper_table = "none"  # the bundled sample is not MESC
    return config
