"""The rollout engine: slots refilled as rows stop give each request exactly what it gives alone, whatever its
slot, the step it was admitted in or the slot count; streaming stops and counts; few programs; sharded equals
one device. (The sampler properties it shares with `engine.generate` are in test_sampling.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import engine, sharding
from dapo_jax import model as M
from dapo_jax.engine import Engine, EngineConfig, Request
from dapo_jax.sampling import SamplingParams

ONE = sharding.make_mesh(devices=jax.devices()[:1])
STOPS = tuple(range(3, 40))  # ~15% of a tiny model's vocabulary: lengths from 1 to the budget


@pytest.fixture(scope="module")
def model():
  return M.init_sharded(M.preset("tiny", num_heads=8, num_kv_heads=4), ONE, seed=11)


def requests(n=37, seed=0, samples=2, longest=40):
  """n groups of prompts 1..longest tokens long (40: three prompt widths), budgets 1..24."""
  rng = np.random.default_rng(seed)
  return [Request(rng.integers(40, 250, rng.integers(1, longest + 1)).tolist(), samples, key_id=1000 + i,
                  max_new_tokens=int(rng.integers(1, 25)), tag=i) for i in range(n)]


def run(model, reqs, params, config, rng=jax.random.key(0)):
  eng = Engine(params, config)
  out = {r.request.tag: r for r in eng.stream(model, reqs, rng)}
  return out, eng.stats


def assert_same(a, b, exact_logprobs=False):
  assert a.keys() == b.keys()
  for tag in a:
    for x, y in zip(a[tag].tokens, b[tag].tokens):
      np.testing.assert_array_equal(x, y, err_msg=f"request {tag}")
    for x, y in zip(a[tag].logprobs, b[tag].logprobs):
      (np.testing.assert_array_equal if exact_logprobs else
       lambda p, q, err_msg: np.testing.assert_allclose(p, q, atol=1e-5, err_msg=err_msg))(x, y, err_msg=f"{tag}")
    np.testing.assert_array_equal(a[tag].truncated, b[tag].truncated)


def test_37_requests_through_4_slots_equal_each_alone_greedily(model):
  params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_ids=STOPS)
  config = EngineConfig(slots=4, steps_per_chunk=5, page_size=8, prefill_batch=2, attention_rows=2)
  reqs = requests()
  together, stats = run(model, reqs, params, config)
  alone = {}
  for r in reqs:
    alone.update(run(model, [r], params, config)[0])
  # Tokens exactly; log-probs to rounding (alone, a prompt is prefilled and read at its own width).
  assert_same(together, alone)
  lengths = [len(t) for g in together.values() for t in g.tokens]
  assert min(lengths) == 1 and max(lengths) == 24 and stats.chunks > 37 * 2 / 4
  for g in together.values():  # each row stops at its first stop id or its own budget
    for t, trunc in zip(g.tokens, g.truncated):
      assert not set(t[:-1].tolist()) & set(STOPS)
      assert trunc == (len(t) == g.request.max_new_tokens and t[-1] not in STOPS)
  assert stats.dropped_groups == 0 and stats.useful_steps == sum(lengths) == stats.decoded_tokens


def test_sampled_tokens_belong_to_the_request_not_the_slot_or_step(model):
  params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, stop_ids=STOPS)
  reqs = requests(seed=1)
  few, _ = run(model, reqs, params, EngineConfig(slots=4, steps_per_chunk=3, page_size=8))
  many, _ = run(model, reqs, params, EngineConfig(slots=64, page_size=16))
  backwards, _ = run(model, reqs[::-1], params, EngineConfig(slots=8, steps_per_chunk=7, refill_fraction=1.0))
  # Other slot counts are other matmul shapes: log-probs agree to rounding, tokens exactly.
  assert_same(few, many)
  assert_same(few, backwards)
  # The key id picks the randomness: another id, other samples.
  moved = [r._replace(key_id=r.key_id + 1) for r in reqs]
  other, _ = run(model, moved, params, EngineConfig(slots=4, steps_per_chunk=3, page_size=8))
  assert sum(not np.array_equal(a, b) for t in few for a, b in zip(few[t].tokens, other[t].tokens)) > 37


def test_logprobs_equal_a_teacher_forced_forward_pass_after_refills(model):
  params = SamplingParams(max_new_tokens=24, temperature=0.8, stop_ids=STOPS)
  reqs = requests(n=9, seed=2, samples=3, longest=16)
  out, stats = run(model, reqs, params, EngineConfig(slots=4, steps_per_chunk=4, page_size=8))
  assert stats.chunks > 3
  rows = [(list(g.request.prompt_ids), t, lp) for g in out.values() for t, lp in zip(g.tokens, g.logprobs)]
  width = max(len(p) + len(t) for p, t, _ in rows)
  full = np.zeros((len(rows), width), np.int32)
  for i, (p, t, _) in enumerate(rows):
    full[i, :len(p) + len(t)] = p + t.tolist()
  mask = np.arange(width)[None] < np.asarray([len(p) + len(t) for p, t, _ in rows])[:, None]
  logp = jax.nn.log_softmax(model(jnp.asarray(full), attn_mask_BxT=jnp.asarray(mask)) / 0.8, -1)
  for i, (p, t, lp) in enumerate(rows):  # one forward pass over every row, right-padded
    at = np.arange(len(p) - 1, len(p) + len(t) - 1)
    np.testing.assert_allclose(lp, np.asarray(logp[i, at, t]), atol=2e-5)


def test_long_prompts_prefilled_in_pieces_equal_whole(model):
  params = SamplingParams(max_new_tokens=12, temperature=0.0)
  prompt = list(range(50, 120))  # 70 tokens: bucket 96, in pieces of 32
  reqs = [Request(prompt, 2, key_id=0), Request(prompt[:20], 1, key_id=1)]
  whole, _ = run(model, reqs, params, EngineConfig(slots=4, prefill_chunk=0))
  pieces, stats = run(model, reqs, params, EngineConfig(slots=4, prefill_chunk=32))
  assert_same({k.request.key_id: k for k in whole.values()}, {k.request.key_id: k for k in pieces.values()})
  assert stats.prefill_calls == 1


def test_closing_the_stream_stops_decoding_and_counts_the_groups_in_flight(model):
  params = SamplingParams(max_new_tokens=24, temperature=1.0, stop_ids=STOPS)
  reqs = requests(seed=3)
  pulled = []

  def source():
    for r in reqs:
      pulled.append(r.tag)
      yield r
  eng = Engine(params, EngineConfig(slots=8, steps_per_chunk=4, page_size=8))
  stream = eng.stream(model, source(), jax.random.key(0))
  first = [next(stream) for _ in range(5)]
  stream.close()
  stats = eng.stats
  # Requests are pulled as slots free up, not all at once; what was pulled and not returned was dropped.
  assert len(pulled) < len(reqs) and stats.dropped_groups == len(pulled) - 5 >= 1
  full, _ = run(model, reqs, params, EngineConfig(slots=8, steps_per_chunk=4, page_size=8))
  for g in first:  # the groups that did finish are what a full run gives them
    assert all(np.array_equal(a, b) for a, b in zip(g.tokens, full[g.request.tag].tokens))
  assert stats.decoded_tokens > sum(len(t) for g in first for t in g.tokens)


def test_few_programs_across_a_run_with_refills(model):
  params = SamplingParams(max_new_tokens=24, temperature=1.0, stop_ids=STOPS)
  before = engine.compiled_programs()
  run(model, requests(n=40, seed=4), params, EngineConfig(slots=8, steps_per_chunk=4, page_size=8))
  # One decode program and one prefill program per prompt width (prompts of 1..40 tokens: buckets 16, 32, 48),
  # however many chunks and refills the run takes.
  assert engine.compiled_programs() - before <= 2 * 3
  before = engine.compiled_programs()
  run(model, requests(n=40, seed=5), params, EngineConfig(slots=8, steps_per_chunk=4, page_size=8))
  assert engine.compiled_programs() == before  # the next run reuses them


def test_row_sharded_engine_equals_one_device():
  cfg = M.preset("tiny", num_heads=8, num_kv_heads=4)
  params = SamplingParams(max_new_tokens=24, temperature=1.0, stop_ids=STOPS)
  config = EngineConfig(slots=8, steps_per_chunk=4, page_size=8)
  reqs = requests(n=12, seed=6, longest=16)
  ref, _ = run(M.init_sharded(cfg, ONE, seed=12), reqs, params, config)
  for shape in ({"data": 4}, {"data": 2, "fsdp": 2, "tensor": 2}):
    mesh = sharding.make_mesh(shape, devices=jax.devices()[:np.prod(list(shape.values()))])
    many = M.init_sharded(cfg, mesh, seed=12)
    with jax.set_mesh(mesh):
      out, stats = run(many, reqs, params, config)
    assert_same(out, ref)
    assert stats.dropped_groups == 0


def test_bad_requests_and_configs_are_named(model):
  params = SamplingParams(max_new_tokens=8)
  with pytest.raises(ValueError, match="engine: request 7 asks for 9 new tokens; the engine allows 1 to "
                                       "SamplingParams.max_new_tokens=8"):
    run(model, [Request([1, 2], 1, key_id=7, max_new_tokens=9)], params, EngineConfig(slots=4))
  with pytest.raises(ValueError, match="engine: request 3 has an empty prompt"):
    run(model, [Request([], 1, key_id=3)], params, EngineConfig(slots=4))
  with pytest.raises(ValueError, match=r"rollout.engine.slots: must be a positive integer, got 0"):
    EngineConfig(slots=0)
  with pytest.raises(ValueError, match=r"rollout.engine.refill_fraction: must be in \(0, 1\], got 0.0"):
    EngineConfig(refill_fraction=0.0)


def test_unfinished_groups_continue_where_they_stopped(model):
  """A closed stream's groups in flight (`Engine.unfinished`), each row continued from its tokens as a request
  of its own (prompt + tokens, `first_sample` / `first_token`), give what the stream would have: the same
  tokens, log-probs to rounding (the continued tokens are prefilled, not decoded)."""
  params = SamplingParams(max_new_tokens=24, temperature=1.0, stop_ids=STOPS)
  reqs = requests(n=12, seed=4, samples=3)
  config = EngineConfig(slots=8, steps_per_chunk=4, page_size=8)
  eng = Engine(params, config)
  stream = eng.stream(model, iter(reqs), jax.random.key(0))
  first = {g.request.tag: g for g in (next(stream) for _ in range(3))}
  stream.close()
  left = eng.unfinished()
  assert [u.request.tag for u in left] == sorted(u.request.tag for u in left)  # in the source's order
  assert any(u.done.any() and not u.done.all() for u in left)  # some rows of a group finished, some not
  assert any(0 < len(t) for u in left for t, d in zip(u.tokens, u.done) if not d)  # rows cut mid-response
  assert not set(first) & {u.request.tag for u in left}
  more = [Request(list(u.request.prompt_ids) + u.tokens[j].tolist(), 1, u.request.key_id,
                  u.request.max_new_tokens - len(u.tokens[j]), tag=(u.request.tag, j), first_sample=j,
                  first_token=len(u.tokens[j]))
          for u in left for j in range(u.request.num_samples) if not u.done[j]]
  rest, _ = run(model, more, params, config)
  full, _ = run(model, reqs, params, config)
  for u in left:
    for j in range(u.request.num_samples):
      want_t, want_l = full[u.request.tag].tokens[j], full[u.request.tag].logprobs[j]
      if u.done[j]:
        got_t, got_l, trunc = u.tokens[j], u.logprobs[j], u.truncated[j]
      else:
        r = rest[(u.request.tag, j)]
        got_t, got_l = np.concatenate([u.tokens[j], r.tokens[0]]), np.concatenate([u.logprobs[j], r.logprobs[0]])
        trunc = r.truncated[0]
      np.testing.assert_array_equal(got_t, want_t)
      np.testing.assert_allclose(got_l, want_l, atol=1e-5)
      assert trunc == full[u.request.tag].truncated[j]
  # Every group is accounted for: finished, or left for later; none is lost.
  assert {u.request.tag for u in left} | set(first) == set(range(len(first) + len(left)))
