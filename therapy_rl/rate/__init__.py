"""The rating room: clinicians score generated replies, and those scores become a PPO reward.

    store.py          SQLite (WAL) store: raters, batches of replies queued by a PPO run, ratings
    server.py         the rating web app (one page + a small JSON API), every request needs a rater token
    guard_check.py    the safety flags a reply carries before any rater sees it
    human_reward.py   RewardFn for reward.kind = "human": queue a rollout, wait for ratings, skip unrated rows
    reward_model.py   a head on MiniLM embeddings fitted to the ratings; reward.kind = "learned_human"
    agreement.py      Krippendorff's alpha (interval) and per-rater score distributions
    __main__.py       `python -m therapy_rl.rate serve | add-rater | list-raters | train-rm | report | export-unsafe`

The room sits on floor 3 beside ppo/: it implements ppo's RewardFn protocol, and the trainer reaches it only
through reward.kind (a lazy import). store, server and agreement import no jax, so the web app starts fast.
"""
