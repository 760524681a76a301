"""Sharded safetensors (index + shards) read tensor by tensor straight into mesh-sharded arrays, on 8 CPU devices."""
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from therapy_rl import parallel  # noqa: E402
from therapy_rl.models import families, sharded_load  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        max_position_embeddings=32)
    path = str(tmp_path_factory.mktemp("mixtral_sharded"))
    transformers.MixtralForCausalLM(config).save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    return path


def test_checkpoint_is_sharded(sharded_dir):
    names = os.listdir(sharded_dir)
    assert "model.safetensors.index.json" in names
    assert len([n for n in names if n.startswith("model-0000")]) >= 3


def test_each_device_holds_only_its_shard(sharded_dir, monkeypatch):
    mesh = parallel.make_mesh(parallel.MeshShape(data=1, fsdp=2, tensor=2, expert=2))
    config = families.read_hf_config(sharded_dir).replace(vocab_size=70)  # grown vocabulary: 70 = 2 * 35
    reads = []
    original = sharded_load._Reader.read

    def recording_read(self, name, index):
        out = original(self, name, index)
        reads.append((name, out.size, int(np.prod(self.shape(name)))))
        return out

    monkeypatch.setattr(sharded_load._Reader, "read", recording_read)
    params = families.load_hf(sharded_dir, config, mesh=mesh, seed=1)
    monkeypatch.undo()
    host = families.load_hf(sharded_dir, config, seed=1)

    specs = parallel.partition_specs(host, families.partition_rules(config), mesh)
    checked = 0
    for (path, array), spec, expected in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                             jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                                             jax.tree.leaves(host)):
        shard_shape = tuple(dim // int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
                            if axes is not None else dim for dim, axes in zip(array.shape, tuple(spec) + (None,) * 4))
        assert array.sharding.spec == spec
        for shard in array.addressable_shards:
            assert shard.data.shape == shard_shape, (parallel.tree_path_name(path), shard.data.shape, shard_shape)
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(expected)[shard.index])
        checked += spec != jax.sharding.PartitionSpec()
    assert checked >= 10
    experts = params["layers_0"]["block_sparse_moe"]["w1"]  # [E, D, F] over (expert, fsdp, tensor)
    assert experts.shape == (4, 32, 16) and experts.addressable_shards[0].data.shape == (2, 16, 8)
    # Sharded params were read slice by slice: no single read covered a whole tensor of a sharded param.
    sharded_names = {"model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"}
    partial = [(n, got, whole) for n, got, whole in reads if n in sharded_names]
    assert partial and all(got < whole for _, got, whole in partial)
    grown = np.asarray(jax.device_get(params["embed_tokens"]["embedding"]))
    np.testing.assert_array_equal(grown, np.asarray(host["embed_tokens"]["embedding"]))  # same new rows everywhere
