"""Evaluate an SFT or PPO run on the MESC test split (454 samples) with every metric, BERTScore-MiniLM included.

    python -m therapy_rl.main --config configs/eval_mesc.py --workdir /tmp/eval_rl --config.checkpoint=/path/to/run

Decoding: the settings of a saved decoding.json (this workdir's, else the run's), else config.sampling (the paper's
PPO sampling: top_p 1, top_k 0, temperature 1, 128 new tokens). To tune them like the paper but on VALIDATION
prompts: ``--config.decoding_search.enabled=True`` (the paper's 288-setting grid on the first 100 validation
prompts; temperature, top-k and top-p are traced, so the grid compiles 4 samplers in all; a smaller grid:
``--config.decoding_search.top_p='(0.7,1.0)'``). LLM judge: ``--config.judge.enabled=True
--config.judge.base_url=... --config.judge.model=gpt-4o-mini`` with the key in $OPENAI_API_KEY.
"""

from therapy_rl import defaults


def get_config():
    config = defaults.eval_defaults()
    config.data.source = "mesc"
    config.split = "test"
    config.metrics.bertscore = True
    config.sampling.max_new_tokens = 128
    config.decoding_search.limit = 100
    config.report.paper_table = "mesc"
    return config
