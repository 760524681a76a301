"""The memory estimate: parameter shards from the real partition rules; LoRA keeps optimizer state small."""
import numpy as np

from therapy_rl import memory
from therapy_rl.models import families, lora, mistral

TINY = mistral.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             param_dtype="bfloat16", dtype="bfloat16")


def test_params_split_over_fsdp_and_tensor():
    import jax

    count = families.count_params(jax.eval_shape(lambda k: families.init_params(TINY, k), jax.random.key(0)))
    norms = 2 * 2 * 32 + 32  # replicated RMSNorm scales
    one = memory.estimate(TINY, (1, 1, 1), rows_per_step=8, seq=16)
    eight = memory.estimate(TINY, (1, 4, 2), rows_per_step=8, seq=16)
    assert one.params == 2 * count
    np.testing.assert_allclose(eight.params, 2 * ((count - norms) / 8 + norms))
    assert one.optimizer == 2 * 4 * count  # two float32 moments
    assert eight.activations < one.activations and one.activations_remat < one.activations


def test_lora_optimizer_covers_adapters_only():
    with_lora = TINY.replace(lora=lora.LoraConfig(rank=2))
    est = memory.estimate(with_lora, (1, 1, 1), rows_per_step=8, seq=16)
    adapters = 2 * (2 * (32 * 2 + 2 * 32) + 2 * (32 * 2 + 2 * 16))  # q, o: 32->32; k, v: 32->16; 2 layers
    assert est.grads == 4 * adapters and est.optimizer == 2 * 4 * adapters


def test_moe_experts_shard_over_the_expert_axis():
    moe = TINY.replace(model_type="mixtral", num_local_experts=4)
    alone = memory.estimate(moe, (1, 1, 1), 8, 16)
    assert memory.estimate(moe, (1, 1, 1, 2), 8, 16).params < alone.params / 1.5
    assert memory.estimate(moe, (2, 1, 1), 8, 16).params == alone.params  # pure data parallel replicates experts
    assert memory.estimate(moe, (1, 1, 1, 2), 8, 16).activations == memory.estimate(moe, (2, 1, 1), 8, 16).activations
