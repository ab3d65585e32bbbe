"""Where a decode step's time goes: the rollout engine's decode loop under the jax profiler, joined with its
optimized HLO.

    .venv/bin/python benchmarks/sampler_profile.py [--model S] [--devices 2] [--new 128]

Same shapes as `sampler_bench.py` (8 prompts x 8 samples, 32-token prompts, float32). Runs the engine on
`--devices` host devices on a `data` mesh (each decodes its slots in its own loop), times it (best of
`--repeats`), traces one more run and sums the time of every op inside the decode loops, per device and
step, in three groups: weight matmuls (a dot with no batch dimension; with its GFLOP/s), attention (batched
dots over cached keys and values) and everything else (XLA's other fusions: norms, RoPE, cache writes,
softmax, sampling), biggest first. The profiler adds a little time to each op, so the groups sum to a bit
more than the timed step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time


def parse(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="S", help="S or M, as in sampler_bench.py")
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--new", type=int, default=128, help="new tokens a row")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--top", type=int, default=12, help="how many of the other ops to list")
  return p.parse_args(argv)


def loop_ops(hlo: str) -> dict[str, str]:
  """{instruction name: what it computes} for the ops inside the bodies of the sampler's decode loops, from
  XLA's optimized HLO text: "matmul <out shape> (K=..)" for a dot with no batch dimension, "attention <out
  shape>" for a batched dot, "other: <ops>" for the rest."""
  comps = {m.group(1): m.group(2) for m in re.finditer(r"^(?:ENTRY )?%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo,
                                                        re.S | re.M)}
  # The engine's decode loop, and what it calls: the loop over prompt blocks, the branches that read a cache
  # segment or write one. The RNG's own small while loops run before the loop and are left out.
  bodies = [m.group(1) for m in re.finditer(r" while\(.*?body=%([\w.\-]+), metadata=\{op_name=\"([^\"]*)\"", hlo)
            if re.search(r"_decode_jit\)/(shard_map/)?while$", m.group(2))]
  seen = set(bodies)
  for body in bodies:  # grows as nested loops and branches are found
    for called in re.findall(r"(?:body|branch_computations|true_computation|false_computation)=\{?([^}\n]*)",
                             comps.get(body, "")):
      for name in re.findall(r"%([\w.\-]+)", called.split(", metadata")[0]):
        if name in comps and name not in seen and "condition" not in name:
          seen.add(name)
          bodies.append(name)
  ops = {}
  for body in bodies:
    text = comps.get(body, "")
    for m in re.finditer(r"^\s+(?:ROOT )?%([\w.\-]+) = (?:\([^=]*?\)|\S+) ([a-z][\w\-]*)\((.*)", text, re.M):
      name, opcode, rest = m.groups()
      if opcode in ("parameter", "get-tuple-element", "tuple", "bitcast", "constant"):
        continue  # no work, or no kernel of its own
      called = re.search(r"calls=%([\w.\-]+)", rest) if opcode == "fusion" else None
      # A fusion's ops are in the computation it calls; XLA leaves some dots unfused.
      inner, scope = (comps.get(called.group(1), ""),) * 2 if called else (m.group(0), text)
      dot = re.search(r"= (\S+) dot\(%([\w.\-]+), %([\w.\-]+)\), ([^\n]*)", inner)
      if dot:
        out_shape, lhs, _, dims = dot.groups()
        lhs_shape = re.search(rf"%{re.escape(lhs)} = (\S+) ", scope).group(1)
        lhs_dims = [int(x) for x in re.search(r"\[([\d,]*)\]", lhs_shape).group(1).split(",")]
        k = lhs_dims[int(re.search(r"lhs_contracting_dims=\{(\d+)", dims).group(1))]
        if "lhs_batch_dims" in dims:
          ops[name] = "attention " + out_shape.split("{")[0]
        else:
          # The weight's contracting dimension tells the tied LM head ([V, D], contracted on D) from the rest.
          rhs_k = re.search(r"rhs_contracting_dims=\{(\d+)", dims).group(1)
          ops[name] = f"matmul {out_shape.split('{')[0]} (K={k}, weight contracted on dim {rhs_k})"
      elif called:
        kinds = sorted(set(re.findall(r"= \S+ ([a-z][\w\-]*)\(", inner)) -
                       {"parameter", "bitcast", "constant", "broadcast", "reshape"})
        ops[name] = "other: " + ",".join(kinds)
      else:
        ops[name] = "other: " + opcode
  return ops


def matmul_flops(desc: str) -> float:
  m, n = (int(x) for x in re.findall(r"\d+", desc.split("(")[0].split("[")[1])[:2])
  return 2.0 * m * n * int(re.search(r"K=(\d+)", desc).group(1))


def main():
  args = parse()
  dump = tempfile.mkdtemp(prefix="sampler_profile_")
  # XLA reads these once, when jax starts.
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} --xla_dump_to={dump} "
                             "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode_jit.* "
                             + os.environ.get("XLA_FLAGS", ""))
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import jax
  import numpy as np

  from benchmarks import sampler_bench as SB
  from dapo_jax import model as M
  from dapo_jax import sharding

  SB.NEW = args.new
  cfg = M.ModelConfig(architecture="qwen2", tie_word_embeddings=True, rope_theta=10000.0,
                      max_position_embeddings=4096, **SB.MODELS[args.model])
  prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (SB.PROMPTS, SB.PROMPT_LEN)).tolist()
  mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:args.devices])
  _, run = SB.ours(cfg, mesh, prompts)
  (pre, full), = SB.time_alternately([run], args.repeats)
  step_s = (full - pre) / (args.new - 1)
  print(f"model {args.model}, {args.devices} devices, {SB.PROMPTS}x{SB.SAMPLES} rows, {args.new} new tokens: "
        f"decode step {step_s * 1e3:.3f} ms, {SB.PROMPTS * SB.SAMPLES / step_s:,.0f} tok/s")

  alone_s, alone_flops = SB.weight_matmuls_alone(cfg, mesh, args.repeats)
  print(f"the step's weight matmuls alone, back to back: {alone_s * 1e3:.3f} ms a step, "
        f"{alone_flops / alone_s / 1e9:.1f} GFLOP/s a device")

  trace_dir = os.path.join(dump, "trace")
  with jax.profiler.trace(trace_dir):
    run(args.new)
  hlo_files = sorted(glob.glob(os.path.join(dump, "*decode_jit*.cpu_after_optimizations.txt")),
                     key=os.path.getmtime)
  ops = loop_ops(open(hlo_files[-1]).read())
  events = json.load(gzip.open(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]))
  us = collections.Counter()
  count = collections.Counter()
  for e in events["traceEvents"]:
    if e.get("ph") == "X" and e.get("name") in ops:
      us[ops[e["name"]]] += e["dur"]
      count[ops[e["name"]]] += 1
  steps = args.devices * args.new  # every loop iteration runs one decode step
  groups = {"weight matmuls": [d for d in us if d.startswith("matmul")],
            "attention": [d for d in us if d.startswith("attention")],
            "other ops": [d for d in us if d.startswith("other")]}
  total = sum(us.values()) / steps
  print(f"per device and step, under the profiler: {total:,.0f} us in {sum(count.values()) / steps:.0f} ops")
  for group, descs in groups.items():
    t = sum(us[d] for d in descs) / steps
    line = f"  {group:15s} {t:7.0f} us ({100 * t / total:4.1f}%)  {sum(count[d] for d in descs) / steps:5.1f} ops"
    if group == "weight matmuls":
      flops = sum(matmul_flops(d) * count[d] for d in descs) / steps
      line += f"  {flops / t / 1e3:.1f} GFLOP/s a device"
    print(line)
    listed = descs if group != "other ops" else sorted(descs, key=lambda d: -us[d])[:args.top]
    for d in sorted(listed, key=lambda d: -us[d]):
      extra = f"  {matmul_flops(d) * count[d] / us[d] / 1e3:5.1f} GFLOP/s" if group == "weight matmuls" else ""
      print(f"    {us[d] / steps:7.1f} us  {count[d] / steps:4.1f}x  {d[:100]}{extra}")


if __name__ == "__main__":
  main()
