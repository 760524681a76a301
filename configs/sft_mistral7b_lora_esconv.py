"""LoRA SFT of Mistral-7B on ESConv: the Stanford report's baseline (Barrow, "Reinforcement Learning in Mental
Healthcare").

    python -m therapy_rl.main --config configs/sft_mistral7b_lora_esconv.py --workdir runs/mistral_sft \
        --config.model.hf_checkpoint=/path/to/Mistral-7B-v0.1

The checkpoint folder holds config.json, model.safetensors (or model-0000k-of-0000n.safetensors + the index) and
tokenizer.json; its weights are read tensor by tensor straight into the mesh shards. LoRA rank 16, alpha 32,
dropout 0.05 on q/k/v/o; only the adapters (and, for the run's new marker tokens, the token embedding and LM head:
`model.lora.train_embeddings`) train and only they have optimizer state. bfloat16 compute with remat.
Mesh: fsdp over the devices of a host and tensor parallel 1 (one v4-8 host or 8 x A100: about 4 GiB per device
with remat; `python -m therapy_rl.memory --config configs/sft_mistral7b_lora_esconv.py --preset mistral-7b`).
Tiny CPU run (tests): --config.model.hf_checkpoint=TINY_DIR --config.max_steps=2 --config.mesh.fsdp=4 ...
"""

from therapy_rl import defaults


def get_config():
    config = defaults.sft_defaults()
    config.data.source = "esconv"
    config.data.max_length_tokens = 512
    config.data.max_prompt_tokens = 384
    config.data.drop_long = True
    config.model.family = "mistral"
    config.model.dtype = "bfloat16"
    config.model.remat = True
    config.model.dropout_rate = 0.0
    config.model.lora.rank = 16
    config.model.lora.alpha = 32.0
    config.model.lora.dropout_rate = 0.05
    config.model.lora.target_regex = r"self_attn/(q_proj|k_proj|v_proj|o_proj)$"
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.global_batch_size = 32
    config.num_epochs = 3.0
    config.learning_rate = 2e-4
    config.warmup_fraction = 0.03
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    config.sampling.max_new_tokens = 128
    return config
