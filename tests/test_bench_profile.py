"""bench/profile_steps.py's parts: HLO parsing, op classes, self times of nested profiler events, the table."""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import profile_steps as P  # noqa: E402

HLO = """HloModule m
%fused_computation.1 (p0: f32[4,8]) -> f32[4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[4]{0} reduce(%p0, %c), dimensions={1}, to_apply=%add
}
%fused_computation.2 (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %d = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
%fused_computation.3 (p0: f32[4,8]) -> f32[8,4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[8,4]{1,0} transpose(%p0), dimensions={1,0}
}
ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %ynn_fusion.1 = f32[4]{0} fusion(%a), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(f)/h_3/mlp/reduce_sum"}
  %ynn_fusion.2 = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.2
  %copy_fusion = f32[8,4]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation.3
  ROOT %tk = (f32[4,2]{1,0}, s32[4,2]{1,0}) custom-call(%ynn_fusion.2), custom_call_target="TopK"
}
"""


def test_classes_follow_what_the_instruction_computes():
    instructions, computations = P.parse_hlo_module(HLO)
    classify = lambda name: P.classify(instructions[name], computations, name)  # noqa: E731
    assert classify("ynn_fusion.1") == "reductions (softmax, norms, loss, sums)"  # a YNNPACK fusion without a dot
    assert classify("ynn_fusion.2") == "matmul (dot)"
    assert classify("copy_fusion") == "copies and transposes"
    assert classify("tk") == "top-k and sort"
    assert instructions["ynn_fusion.1"].op_name == "jit(f)/h_3/mlp/reduce_sum"
    assert P._short_op_name(instructions["ynn_fusion.1"].op_name) == "h_*/mlp/reduce_sum"  # layers add up


def test_a_traced_jitted_function_gives_a_table_of_its_ops(tmp_path):
    f = jax.jit(lambda a, b: jax.nn.relu(a @ b).sum(axis=0))
    a = jnp.ones((256, 256))
    f(a, a).block_until_ready()
    module = P.parse_hlo_module(f.lower(a, a).compile().as_text())
    rows, wall = P.trace_calls(lambda: f(a, a).block_until_ready(), calls=3)
    assert rows and wall > 0 and all(r["self_ns"] >= 0 for r in rows)
    names = {r["module"] for r in rows}
    table = P.profile_table(rows, {(-2, name): module for name in names}, calls=3)
    shares = {c["class"]: c["share"] for c in table["classes"]}
    assert abs(sum(shares.values()) - 1.0) < 1e-6
    assert shares.get("matmul (dot)", 0) > 0.2  # a 256^3 matmul against a relu and a column sum
