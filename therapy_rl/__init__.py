"""therapy_rl: emotion-aware therapeutic reply generation (SFT + PPO) in JAX/Flax."""
__version__ = "0.1.0"
