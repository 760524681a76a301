"""PPO of Mixtral-8x7B (top-2 of 8 experts) from a LoRA SFT run, as in the Stanford report.

    python -m therapy_rl.main --config configs/sft_mistral7b_lora_esconv.py --workdir runs/mixtral_sft \
        --config.model.hf_checkpoint=/path/to/Mixtral-8x7B-v0.1
    python -m therapy_rl.main --config configs/ppo_mixtral8x7b.py --workdir runs/mixtral_ppo \
        --config.init_from=runs/mixtral_sft

The model (family, LoRA, the router's load-balancing weight `router_aux_loss_coef`, set in the SFT run with
--config.model.router_aux_loss_coef) comes from the SFT run; the aux loss is added to the PPO loss and logged as
policy/aux_loss_avg. The reference policy is the trunk with its adapters off: no second copy of the 47B weights.

Mesh (documented, 32 devices: a TPU v5p-64 slice's 32 chips, or 4 hosts of 8 x H100-80GB):
expert=2 (each MoE layer's 8 experts split 4 + 4; the batch is split over it too), fsdp=8, tensor=2.
Parameters are bf16 (93 GiB in all): 2.9 GiB per device; see the README's memory table and
`python -m therapy_rl.memory --config configs/sft_mistral7b_lora_esconv.py --preset mixtral-8x7b --mesh 1,8,2,2`.
"""

from therapy_rl import defaults


def get_config():
    config = defaults.ppo_defaults()
    config.data.source = "esconv"
    config.mesh.data = 1
    config.mesh.expert = 2
    config.mesh.fsdp = 8
    config.mesh.tensor = 2
    config.global_batch_size = 64
    config.ppo.minibatch_size = 16
    config.ppo.num_ppo_epochs = 4
    config.learning_rate = 1e-5
    config.ppo.init_kl_coef = 0.1
    config.sampling.max_new_tokens = 128
    config.num_epochs = 1.0
    config.eval_every_iterations = 25
    config.checkpoint_every_iterations = 25
    config.num_eval_prompts = 128
    return config
