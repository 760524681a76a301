"""The MESC reproduction of Zhang & Ive end to end (issue 14), sized for 2 CPU cores:

    python -m therapy_rl.repro --config configs/repro_mesc.py --workdir runs/repro

1. pre-train a byte-level BPE and a small GPT-2 (4 layers, 256 wide) with causal LM on dialogue text from
   $THERAPY_RL_DATA (MESC train only; never MESC val/test or ESConv test);
2. SFT on MESC train with and without the therapist emotion, best by validation loss;
3. PPO from the with-emotion SFT in configs/ppo_paper_as_described.py, ppo_paper_as_run.py and ppo_ours.py, best by
   validation reward;
4. decoding chosen on MESC validation; the pre-trained model, both SFTs and the three PPOs evaluated on MESC test
   and ESConv test; <workdir>/RESULTS.md written by tools/repro_results.py.
The same command again skips finished stages (a DONE file each) and resumes a killed one from its checkpoints.
Any field can be overridden, e.g. ``--config.pretrain.max_steps=600``.
"""

from therapy_rl import defaults


def get_config():
    return defaults.repro_defaults()
