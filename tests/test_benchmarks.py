"""The sampler benchmarks' own arithmetic and HLO reading, which the README's tables and profile come from."""

import collections
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import sampler_bench, sampler_profile  # noqa: E402
from dapo_jax import model as M  # noqa: E402
from dapo_jax import engine, sampling, sharding  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


def _cfg(**shape):
  return M.ModelConfig(architecture="qwen2", tie_word_embeddings=True, rope_theta=10000.0,
                       max_position_embeddings=256, **shape)


def test_weight_matmul_shapes_are_every_parameter_but_norms_and_biases():
  for shape in (*sampler_bench.MODELS.values(), TINY):
    cfg = _cfg(**shape)
    norms = cfg.hidden_size * (2 * cfg.num_layers + 1)
    biases = cfg.num_layers * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    matmuls = sum(a * b for a, b in sampler_bench.weight_matmul_shapes(cfg))
    assert matmuls + norms + biases == cfg.num_params()
  # S: its 3,822,848 parameters less 2,816 in norms and 2,560 in q/k/v biases, two FLOPs each.
  s = _cfg(**sampler_bench.MODELS["S"])
  assert s.num_params() == 3_822_848
  assert sampler_bench.decode_flops_per_token(s, 0) == 2 * (3_822_848 - 2_816 - 2_560)
  # TINY by hand (head_dim 8): fused q/k/v 32 -> (4 + 2 * 2) * 8, output 32 -> 32, fused gate/up 32 -> 2 * 48,
  # down 48 -> 32, per layer; then the LM head 32 -> 64.
  tiny = _cfg(**TINY)
  assert sampler_bench.weight_matmul_shapes(tiny) == [(32, 64), (32, 32), (32, 96), (48, 32)] * 2 + [(32, 64)]
  assert tiny.num_params() == 17_696
  # Attention over a context of C slots adds a scores and a values product per layer: 2 * 2 * 2 * C * 4 * 8.
  assert sampler_bench.decode_flops_per_token(tiny, 0) == 2 * 17_408
  assert sampler_bench.decode_flops_per_token(tiny, 10) == 2 * 17_408 + 2 * 2 * 2 * 10 * 4 * 8


def test_matmuls_alone_does_a_decode_steps_matmul_flops_per_device():
  cfg = _cfg(**TINY)
  mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:2])
  seconds, flops = sampler_bench.weight_matmuls_alone(cfg, mesh, repeats=1)
  # 8 prompts x 8 samples over 2 devices: 32 rows each, two FLOPs per weight element per row.
  assert (sampler_bench.PROMPTS, sampler_bench.SAMPLES) == (8, 8)
  assert flops == 32 * 2 * 17_408
  # A step of 32-row matmuls of a 17k-parameter model: well under a second even on a loaded 2-core machine
  # (a step that did no work, or a broken timer, reads 0 or inf).
  assert 0 < seconds < 1.0, seconds


def test_profile_reads_the_decode_loops_ops_from_the_compiled_engine():
  cfg = _cfg(**TINY)
  model = M.init_sharded(cfg, sharding.make_mesh(devices=jax.devices()[:1]), seed=0)
  params = sampling.SamplingParams(max_new_tokens=16, temperature=1.0)
  requests = [engine.Request([1, 2, 3], 2, key_id=0), engine.Request([4, 5], 2, key_id=1)]
  hlo = engine.lower_decode(model, requests, params, engine.EngineConfig(slots=4)).compile().as_text()
  ops = sampler_profile.loop_ops(hlo)
  kinds = [d.split(" ")[0] for d in ops.values()]
  layers = cfg.num_layers
  # A 16-token budget is one cache segment: per layer q/k/v, output, gate/up and down, then the LM head;
  # attention is a scores and a values dot for each of the prompt part (its loop over prompt blocks) and the
  # generated part (the segment's branch).
  assert kinds.count("matmul") == 4 * layers + 1
  assert kinds.count("attention") == 2 * 2 * layers
  assert set(kinds) == {"matmul", "attention", "other:"}  # the rest of a step (norms, sampling, cache writes)
  heads = [d for d in ops.values() if d.startswith("matmul") and "contracted on dim 1" in d]
  assert heads == [f"matmul f32[4,{cfg.vocab_size}] (K={cfg.hidden_size}, weight contracted on dim 1)"]
  assert sampler_profile.matmul_flops(heads[0]) == 2.0 * 4 * cfg.vocab_size * cfg.hidden_size
  # Every op is an instruction of the compiled program, named as it is there.
  assert all(f"%{name} = " in hlo for name in ops)
  # The weight matmuls of a 4-row step, as weight_matmul_shapes has them: per layer fused q/k/v [32 -> 64],
  # output [32 -> 32], fused gate/up [32 -> 96], down [48 -> 32]; the tied LM head reads the [64, 32] embedding.
  matmuls = collections.Counter(d for d in ops.values() if d.startswith("matmul"))
  assert matmuls == {"matmul f32[4,64] (K=32, weight contracted on dim 0)": layers,
                     "matmul f32[4,32] (K=32, weight contracted on dim 0)": layers,
                     "matmul f32[4,96] (K=32, weight contracted on dim 0)": layers,
                     "matmul f32[4,32] (K=48, weight contracted on dim 0)": layers,
                     "matmul f32[4,64] (K=32, weight contracted on dim 1)": 1}
  assert sum(sampler_profile.matmul_flops(d) * n for d, n in matmuls.items()) == 2.0 * 4 * 17_408
