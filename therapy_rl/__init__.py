"""therapy_rl: emotion-aware therapeutic reply generation (SFT + PPO) in JAX/Flax.

    import therapy_rl
    policy = therapy_rl.load("runs/qs_ppo")          # a trained run's best checkpoint, behind the crisis guard
    print(policy.reply("I feel drained after work.").text)

`load`, `Policy`, `Reply`, `Message` live in `therapy_rl.api`; `open_run` and `Run` in `therapy_rl.run`. They are
imported on first use, so `import therapy_rl` stays cheap (no jax).
"""
__version__ = "0.1.0"
__all__ = ["load", "Policy", "Reply", "Message", "open_run", "Run"]

_LAZY = {"Policy": "api", "Reply": "api", "Message": "api", "open_run": "run", "Run": "run"}


def load(workdir, checkpoint="best", **kwargs):
    """A trained run as a `therapy_rl.api.Policy` (see `therapy_rl.api.load` for the options)."""
    from therapy_rl import api

    return api.load(workdir, checkpoint, **kwargs)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"therapy_rl.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'therapy_rl' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
