"""The DAPO training loop: `train_and_evaluate(config, workdir)`.

Per step: sample generation batches (G responses per prompt), score them, keep the groups whose answers
disagree until the batch is full (dynamic sampling), shape rewards for length, compute group advantages,
recompute old log-probs, run the mini-batch updates; evaluate avg@k every N steps; log; checkpoint.
Everything a resumed run needs is in the checkpoint, so a killed run continues bitwise.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dapo_jax import checkpoint as ckpt_lib
from dapo_jax import config_lib
from dapo_jax import distributed
from dapo_jax import memory
from dapo_jax import sharding
from dapo_jax.advantages import group_advantages
from dapo_jax.dynamic_sampling import DynamicSampling, GroupAccumulator, concat_rows
from dapo_jax.evaluate import summarize
from dapo_jax.metrics import MetricWriter, Progress, plot_run, read_metrics, read_samples
from dapo_jax.rewards import OverlongShaping, RewardExecutor
from dapo_jax.sampling import Rollout, SamplingParams, generate
from dapo_jax.train_step import Batch, Trainer, pad_rows
from dapo_jax import tasks

_PROMPT_KEYS = ("prompt_BxP", "prompt_mask_BxP")


class _Stop:
  """Set by SIGTERM / SIGINT: finish the step, checkpoint, exit."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals cannot be caught here
        pass
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("signal %d: checkpointing after this step, then stopping (Ctrl-C again to abort)", signum)
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process has been asked to stop (a collective: every process calls it at the same point)."""
    return any(distributed.allgather_objects(self.requested))

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _timed(timings: dict, name: str):
  class _T:
    def __enter__(self):
      self.t = time.perf_counter()

    def __exit__(self, *exc):
      timings[f"timing_s/{name}"] = timings.get(f"timing_s/{name}", 0.0) + time.perf_counter() - self.t
  return _T()


class RolloutScorer:
  """Samples G responses for a list of task rows and scores them; returns rows for the accumulator."""

  def __init__(self, config, task: tasks.Task, executor: RewardExecutor, overlong: OverlongShaping):
    self.config, self.task, self.executor, self.overlong = config, task, executor, overlong
    r = config.rollout
    tok = task.tokenizer
    self.params = SamplingParams(max_new_tokens=r.max_response_length, temperature=r.temperature, top_p=r.top_p,
                                 top_k=r.top_k, stop_ids=tok.stop_ids, pad_id=tok.pad_id)

  def __call__(self, model, rows: list[dict], rng, timings: dict) -> dict[str, np.ndarray]:
    """`rows` is the whole generation batch (the same on every process); each process scores its block of
    the responses and the scores are exchanged, so every process returns the same arrays."""
    g = self.config.rollout.group_size
    with _timed(timings, "gen"):
      out = generate_in_chunks(model, [row["prompt_ids"] for row in rows], self.params, rng, g,
                               self.config.rollout.gen_chunk_size)
    tokens, mask = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
    with _timed(timings, "reward"):
      texts = [self.task.tokenizer.decode(tokens[i][mask[i]]) for i in range(len(tokens))]
      truths = [rows[i // g]["answer"] for i in range(len(tokens))]
      results = score_shared(self.executor, texts, truths)
    lengths = np.asarray(out.lengths_B)
    return {
        "prompt_BxP": np.asarray(out.prompt_BxP), "prompt_mask_BxP": np.asarray(out.prompt_mask_BxP),
        "tokens_BxN": tokens, "mask_BxN": mask, "sampler_logp_BxN": np.asarray(out.logprobs_BxN),
        # Old log-probs are recomputed before the update with the weights that sampled these rows. Rows that
        # dynamic sampling carries to the next step get theirs computed in their own step and marked known
        # (see `_carry_behaviour_logprobs`).
        "old_logp_BxN": np.zeros(tokens.shape, np.float32), "old_logp_known_B": np.zeros(len(tokens), bool),
        "lengths_B": lengths, "truncated_B": np.asarray(out.truncated_B),
        "acc_B": np.asarray([r["acc"] for r in results], np.float32),
        "score_B": np.asarray([r["score"] for r in results], np.float32),
        "penalty_B": self.overlong.penalty(lengths).astype(np.float32),
        "prompt_len_B": np.asarray(out.prompt_mask_BxP).sum(axis=1),
        "text_B": np.asarray(texts, dtype=object), "truth_B": np.asarray(truths, dtype=object),
    }


@jax.jit
def _rows_where(known_MxmxB, carried_MxmxBxN, old_MxmxBxN):
  return jnp.where(known_MxmxB[..., None], carried_MxmxBxN, old_MxmxBxN)


@jax.jit
def _probs_diff(sampler_logp, old_logp, mask):
  """|p_sampler - p_old| over the loss tokens (the reference's training/rollout_probs_diff_*): how far the
  sampler's probabilities are from those the update's clip is centred on."""
  mask = mask > 0
  diff = jnp.where(mask, jnp.abs(jnp.exp(sampler_logp) - jnp.exp(old_logp)), 0.0)
  return {"training/rollout_probs_diff_max": jnp.max(diff),
          "training/rollout_probs_diff_mean": jnp.sum(diff) / jnp.maximum(jnp.sum(mask), 1)}


def _carry_from_record(state: dict) -> dict:
  """A checkpoint's carried groups; those from before old log-probs were kept get theirs recomputed."""
  for part in state.get("carry", []):
    part.setdefault("old_logp_BxN", np.zeros(np.shape(part["tokens_BxN"]), np.float32))
    part.setdefault("old_logp_known_B", np.zeros(len(part["tokens_BxN"]), bool))
  return state


def _carry_behaviour_logprobs(trainer: Trainer, params, accumulator: GroupAccumulator, rows: int):
  """Computes the log-probs of the groups carried into the next step under `params`, the weights that
  sampled them: the next step's update has newer weights, and recomputing there would centre the clip on
  them (ratio 1 at the start) instead of on the policy the samples came from. Rows carried before (a surplus
  of more than a batch is carried again) keep the log-probs they have. Batches of `rows` rows: the update's
  shapes, no new program."""
  part = accumulator.carried
  if part is None or part["old_logp_known_B"].all():
    return
  todo = np.flatnonzero(~part["old_logp_known_B"])
  old_BxN = np.array(part["old_logp_BxN"], np.float32)
  for start in range(0, len(todo), rows):
    idx = todo[start:start + rows]
    b = Batch(part["prompt_BxP"][idx], part["prompt_mask_BxP"][idx], part["tokens_BxN"][idx],
              part["mask_BxN"][idx].astype(np.float32), part["sampler_logp_BxN"][idx],
              np.zeros(len(idx), np.float32))
    logp = distributed.to_host(trainer.logprobs(params, trainer.shard_batch(pad_rows(b, rows))))
    old_BxN[idx] = np.asarray(logp).reshape(rows, -1)[:len(idx)] * part["mask_BxN"][idx]
  accumulator.set_carry_fields({"old_logp_BxN": old_BxN, "old_logp_known_B": np.ones(len(old_BxN), bool)})


def generate_in_chunks(model, prompts: list, params: SamplingParams, rng, num_samples: int, size: int,
                       *, fill: bool = False) -> Rollout:
  """`generate` over `size` prompts at a time (0: all at once; bounds the KV cache), on host. Chunk i samples
  with fold_in(rng, i) (rng itself when there is one chunk). `fill`: the last chunk is filled up with repeats
  of its first prompt (every call one program), whose samples are dropped."""
  size = size or len(prompts)
  parts = []
  for i, start in enumerate(range(0, len(prompts), size)):
    chunk = list(prompts[start:start + size])
    real = len(chunk) * num_samples
    if fill:
      chunk += [chunk[0]] * (size - len(chunk))
    key = rng if size >= len(prompts) else jax.random.fold_in(rng, i)
    o = distributed.to_host(generate(model, chunk, params, key, num_samples=num_samples))
    parts.append({k: np.asarray(v)[:real] for k, v in o._asdict().items()})
  return Rollout(**concat_rows(parts, left_padded=_PROMPT_KEYS))


def score_shared(executor: RewardExecutor, texts: list[str], truths: list) -> list[dict]:
  """Each process scores its block of the responses; every process gets all the results, in order."""
  block = distributed.share(len(texts))
  return distributed.gather_list(executor.score(texts[block], truths[block]))


def evaluate(model, task: tasks.Task, config, rng, executor: RewardExecutor) -> dict[str, float]:
  """avg@k (mean accuracy over k samples per problem), pass@k and maj@k on the held-out problems."""
  e = config.eval
  rows = task.eval_rows[: e.num_problems]
  tok = task.tokenizer
  params = SamplingParams(max_new_tokens=config.rollout.max_response_length, temperature=e.temperature,
                          top_p=e.top_p, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
  # `eval.chunk_size` problems (x k samples) per sampler call, as rollout.gen_chunk_size for training.
  out = generate_in_chunks(model, [r["prompt_ids"] for r in rows], params, rng, e.k, e.get("chunk_size", 0),
                           fill=True)
  tokens, mask = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
  results = score_shared(executor, [tok.decode(tokens[i][mask[i]]) for i in range(len(tokens))],
                          [rows[i // e.k]["answer"] for i in range(len(tokens))])
  acc = np.asarray([r["acc"] for r in results], np.float32).reshape(len(rows), e.k)
  # maj@k as the evaluation CLI computes it (nan when the reward gives no prediction to vote on).
  overall = summarize([{"answer": row["answer"], "results": results[i * e.k:(i + 1) * e.k]}
                       for i, row in enumerate(rows)], e.k)["overall"]
  return {"val/acc/mean": float(acc.mean()), f"val/acc/mean@{e.k}": float(acc.mean()),
          f"val/pass@{e.k}": float(acc.max(axis=1).mean()), f"val/maj@{e.k}": overall[f"maj@{e.k}"],
          "val/response_length/mean": float(np.asarray(out.lengths_B).mean())}


def _summary(name: str, x) -> dict[str, float]:
  x = np.asarray(x, np.float64)
  return {f"{name}/mean": float(x.mean()), f"{name}/max": float(x.max()), f"{name}/min": float(x.min())}


def token_summary(name: str, x_B, mask_BxN) -> dict[str, float]:
  """Mean, max and min of a per-sequence value over the response tokens (each row weighted by its length,
  rows without a token left out), as the reference logs advantages and returns."""
  counts_B = np.asarray(mask_BxN).astype(bool).sum(axis=1)
  x_B = np.asarray(x_B, np.float64)
  present = counts_B > 0
  if not present.any():
    return {f"{name}/mean": 0.0, f"{name}/max": 0.0, f"{name}/min": 0.0}
  return {f"{name}/mean": float((x_B * counts_B).sum() / counts_B.sum()), f"{name}/max": float(x_B[present].max()),
          f"{name}/min": float(x_B[present].min())}


def _check_workdir_config(workdir: Path, config) -> None:
  saved = workdir / "config.json"
  current = config_lib.comparable(config)
  # Only a run with a checkpoint has anything to resume; one that failed before its first (a missing data
  # file, a config that did not build) is started again with the corrected config.
  checkpoints = workdir / "checkpoints"
  resumable = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
  if saved.is_file() and resumable:
    previous = json.loads(saved.read_text())
    if previous != current and not config.allow_different_config:
      diff = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
      raise ValueError(f"{workdir} holds a run of another config (fields differ: {diff[:8]}); use another "
                       f"--workdir, or pass --config.allow_different_config=True to resume it anyway")
  distributed.barrier("read workdir config")  # every process has compared before process 0 rewrites it
  if distributed.is_main():
    saved.write_text(json.dumps(current, indent=2, sort_keys=True))
    # The whole config as it ran this time (notebooks and `evaluate.load_run` rebuild the run from it).
    (workdir / "run_config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains with DAPO per `config`, writing metrics, checkpoints and plots to `workdir`; returns the last
  evaluation's metrics."""
  if "://" in str(workdir):
    # Path() would turn gs://b/x into a local ./gs:/b/x on every worker: each would write its own.
    raise ValueError(f"--workdir={workdir}: URLs are not supported; give a path every process can reach (a shared "
                     f"disk, or the bucket mounted with gcsfuse, e.g. /mnt/gcs/runs/x)")
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(dict(config.mesh))
  config_lib.validate(config, mesh)  # before anything is built or compiled
  device_gib = memory.device_gib_for(config)
  estimate = memory.estimate_for_config(config, tasks.model_config(config), dict(mesh.shape), device_gib)
  if distributed.is_main():
    print(f"memory per device (estimate):\n{estimate.table()}")
  if not estimate.fits:
    raise config_lib.ConfigValidationError(
        f"config does not fit: the estimated peak of {estimate.peak / memory.GIB:.1f} GiB per device exceeds 90% "
        f"of {device_gib:.1f} GiB (hardware.device_memory_gib={config.hardware.device_memory_gib}, or less if the "
        f"device reports less); use more devices (mesh), smaller micro-batches (actor.micro_batch_size) or "
        f"generation batches")
  _check_workdir_config(workdir, config)
  is_main = distributed.is_main()
  base_key = jax.random.key(config.seed)
  timings: dict[str, float] = {}

  task = tasks.build(config, workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=config.checkpoint.keep,
                                       asynchronous=config.checkpoint.asynchronous)
  model = tasks.build_policy(config, task, mesh)
  update_cfg = config_lib.update_config(config)
  trainer = Trainer(model, update_cfg, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          jax.eval_shape(trainer.init_state, model), trainer.state_shardings)

  accumulator = GroupAccumulator(DynamicSampling(**dict(config.dynamic_sampling),
                                                 train_batch_size=config.rollout.train_batch_size),
                                 config.rollout.group_size, left_padded=_PROMPT_KEYS)
  iterator = task.train_iterator(config.seed)
  restored = checkpointer.restore_latest(abstract)
  with jax.set_mesh(mesh):
    if restored is None:
      model = tasks.warm_start(config, task, model, mesh, workdir)
      state = trainer.init_state(model)
      step = 0
      checkpointer.save(0, state, {"data": iterator.state(), "carry": accumulator.state()}, wait=True)
    else:
      step, state, record = restored
      iterator.restore(record["data"])
      accumulator.restore(_carry_from_record(record["carry"]))
      logging.info("resumed from %s at step %d", checkpointer.directory, step)
      if distributed.is_main():
        print(f"resumed from checkpoint step {step}")
  writer = MetricWriter(workdir, enabled=is_main, resume_from=None if restored is None else step)
  if restored is not None:
    _recover_step_log(writer, workdir, step, record, is_main)

  overlong = OverlongShaping(max_len=config.rollout.max_response_length, buffer=config.overlong.buffer,
                             factor=config.overlong.factor, enable=config.overlong.enable,
                             filter=config.overlong.filter)
  last_eval: dict[str, float] = {}
  gen_prompts = config_lib.gen_batch_prompts(config)
  if gen_prompts != config.rollout.gen_batch_size:
    logging.info("dynamic sampling is off: generation batches of rollout.train_batch_size=%d prompts (every group "
                 "is kept), not rollout.gen_batch_size=%d", gen_prompts, config.rollout.gen_batch_size)
  progress = Progress(config.total_steps, step, enabled=config.log.progress and is_main)
  with RewardExecutor(config.reward.name, workers=config.reward.workers,
                      timeout_s=config.reward.timeout_s) as executor, _Stop() as stop, jax.set_mesh(mesh):
    scorer = RolloutScorer(config, task, executor, overlong)
    if step == 0 and config.eval.before_train:
      last_eval = evaluate(trainer.model(state), task, config, jax.random.fold_in(base_key, 10**9), executor)
      writer.write(0, last_eval)
      if is_main:
        print(f"step 0: held-out avg@{config.eval.k} {last_eval['val/acc/mean']:.3f}")
    stopping = False
    while step < config.total_steps and not stopping:
      timings = {}
      t_step = time.perf_counter()
      model_now = trainer.model(state)
      gen_index = 0
      samples = []
      while not accumulator.ready:
        # Each process reads its share of the prompts; the ids are exchanged to form the global batch.
        rows = distributed.gather_list(iterator.next_batch(gen_prompts))
        rng = jax.random.fold_in(jax.random.fold_in(base_key, step), gen_index)
        batch = scorer(model_now, rows, rng, timings)
        gen_index += 1
        metric = {"acc": batch["acc_B"], "score": batch["score_B"],
                  "seq_reward": batch["score_B"] + batch["penalty_B"]}[config.dynamic_sampling.metric]
        accumulator.add(batch, metric)
        samples.append(batch)
      batch, ds_metrics = accumulator.take()

      with _timed(timings, "adv"):
        reward_B = batch["score_B"] + batch["penalty_B"]
        adv_B = group_advantages(reward_B, config.rollout.group_size)
        loss_mask = batch["mask_BxN"] * overlong.loss_mask(batch["truncated_B"])[:, None]
      update_batch = Batch(batch["prompt_BxP"], batch["prompt_mask_BxP"], batch["tokens_BxN"],
                           loss_mask.astype(np.float32), batch["sampler_logp_BxN"], adv_B)
      # Fewer kept groups than the batch (on_exhausted="train_on_kept"): padded, see `pad_rows`.
      update_batch = pad_rows(update_batch, config.rollout.train_batch_size * config.rollout.group_size)
      sharded = trainer.shard_batch(update_batch)
      if not config.actor.reuse_sampler_logprobs:
        with _timed(timings, "old_log_prob"):
          old = trainer.logprobs(state.params, sharded)
          known_B = batch["old_logp_known_B"]
          if known_B.any():  # carried in: sampled by an earlier step's weights, their log-probs kept
            extra = len(update_batch.adv_B) - len(known_B)
            known = np.concatenate([known_B, np.zeros(extra, bool)])
            carried = np.concatenate([batch["old_logp_BxN"], np.zeros((extra,) + old.shape[-1:], np.float32)])
            old = _rows_where(trainer.shard_rows(known), trainer.shard_rows(carried), old)
          metrics_diff = _probs_diff(sharded.old_logp_BxN, old, sharded.mask_BxN)
          sharded = sharded._replace(old_logp_BxN=jax.block_until_ready(old))
          _carry_behaviour_logprobs(trainer, state.params, accumulator, len(update_batch.adv_B))
      with _timed(timings, "update_actor"):
        state, actor = trainer.update(state, sharded)
        actor = distributed.to_host(actor)
      step += 1

      # A step whose groups were all carried in (carry_over) samples nothing.
      sampled = {k: np.concatenate([s[k] for s in samples] or [np.zeros(0)]) for k in ("lengths_B", "acc_B")}
      n_resp_tokens = float(loss_mask.sum())
      if not config.actor.reuse_sampler_logprobs:
        actor.update(distributed.to_host(metrics_diff))
      metrics = {**ds_metrics, **{k: float(v) for k, v in actor.items()},
                 **_summary("critic/score", reward_B), **_summary("critic/rewards", reward_B),
                 **token_summary("critic/advantages", adv_B, batch["mask_BxN"]),
                 **token_summary("critic/returns", adv_B, batch["mask_BxN"]),
                 **_summary("response_length", batch["lengths_B"]),
                 **_summary("prompt_length", batch["prompt_len_B"]),
                 "critic/acc/mean": float(batch["acc_B"].mean()),
                 "rollout/acc/mean": float(sampled["acc_B"].mean()) if samples else float("nan"),
                 "response_length/clip_ratio": float(batch["truncated_B"].mean()),
                 "critic/overlong_penalty/mean": float(batch["penalty_B"].mean())}
      metrics.update(timings)
      gen_tokens = float(sampled["lengths_B"].sum())
      metrics["perf/gen_tokens_per_s"] = gen_tokens / max(timings.get("timing_s/gen", 0.0), 1e-9)
      metrics["perf/update_tokens_per_s"] = n_resp_tokens / max(timings.get("timing_s/update_actor", 1e-9), 1e-9)

      if config.eval.every and (step % config.eval.every == 0 or step == config.total_steps):
        with _timed(metrics, "testing"):
          last_eval = evaluate(trainer.model(state), task, config, jax.random.fold_in(base_key, 10**9 + step),
                               executor)
        metrics.update(last_eval)
      # The flag is read once a step, and agreed by all processes: the checkpoint here and the loop's exit
      # follow the same reading (read twice, a signal between the reads ended the run one step past its last
      # checkpoint), and no process stops while another goes on into the next step's collectives.
      stopping = stop.agreed()
      every = config.checkpoint.every  # 0: only at the end and on a stop
      sample_lines = _sample_lines(step, batch, config.log.samples_per_step)
      if (every and step % every == 0) or step == config.total_steps or stopping:
        # The step's log rows go into the checkpoint too: a run killed after the save but before it wrote
        # them gets them back when it resumes here (`_recover_step_log`).
        row = {k: float(v) for k, v in metrics.items()}
        log = {"metrics": json.dumps({**row, "timing_s/step": time.perf_counter() - t_step}),
               "samples": sample_lines}
        with _timed(metrics, "save_checkpoint"):
          checkpointer.save(step, state, {"data": iterator.state(), "carry": accumulator.state(), "log": log},
                            wait=stopping)
      metrics["timing_s/step"] = time.perf_counter() - t_step
      writer.write(step, metrics)
      if is_main and sample_lines:
        with open(workdir / "samples.jsonl", "a") as f:
          f.writelines(sample_lines)
      progress.update(step, metrics, {"val/acc/mean": "val_acc", "rollout/acc/mean": "acc",
                                      "critic/score/mean": "score", "actor/entropy": "entropy"})

  checkpointer.close()
  writer.close()
  if is_main:
    plot_run(workdir)
  return last_eval


def _sample_lines(step: int, batch: dict, n: int) -> list[str]:
  """`samples.jsonl` lines for the first `n` responses of the step's batch."""
  return [json.dumps({"step": step, "response": str(batch["text_B"][i]), "truth": str(batch["truth_B"][i]),
                      "acc": bool(batch["acc_B"][i]), "score": float(batch["score_B"][i]),
                      "length": int(batch["lengths_B"][i])}) + "\n"
          for i in range(min(n, len(batch["acc_B"])))]


def _recover_step_log(writer: MetricWriter, workdir: Path, step: int, record: dict, enabled: bool):
  """Writes the checkpoint step's metrics row and sample lines from its record where the logs lack them
  (killed between the save and the writes, or between the two writes)."""
  log = record.get("log")
  if not enabled or not log:
    return
  if not any(r["step"] == step for r in read_metrics(workdir)):
    writer.write(step, json.loads(log["metrics"]))
    logging.info("step %d's metrics restored from its checkpoint", step)
  if log["samples"] and not any(r["step"] == step for r in read_samples(workdir)):
    with open(workdir / "samples.jsonl", "a") as f:
      f.writelines(log["samples"])
    logging.info("step %d's samples restored from its checkpoint", step)