"""The DAPO training loop: `train_and_evaluate(config, workdir)`, one step as a straight walk:

    prompts   -> rollout        `rollout.Rollouts`: G responses per prompt, decoded, scored, length-shaped
              -> filter         `dynamic_sampling.GroupAccumulator`: keep disagreeing groups until the batch is full
              -> advantage      `advantages.group_advantages` (overlong filtering: `rewards.overlong`)
              -> loss, update   `train_step.Trainer`: behaviour (and reference) log-probs, then the mini-batch updates
              -> checkpoint     `checkpoint.Checkpointer` (weights, data position, carried groups, the step's logs)

and every `eval.every` steps `evaluation.evaluate_task`. The first three (`sample_batch`) run in the sampler
(`off_policy.Sampler`): inline, or with `rollout.max_staleness` > 0 ahead of the update on a thread and the
rollout mesh. Everything a resumed run needs is in the checkpoint, so a killed run continues bitwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
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
from dapo_jax import metrics as metrics_lib
from dapo_jax import off_policy
from dapo_jax import tasks
from dapo_jax.advantages import group_advantages
from dapo_jax.dynamic_sampling import GroupAccumulator, keep_groups, pad_rows
from dapo_jax.evaluation import evaluate_task
from dapo_jax.metrics import MetricWriter, Progress, plot_run, read_metrics, read_samples
from dapo_jax.rollout import PartialGroup, Rollouts, ScoredBatch
from dapo_jax.rollout_correction import RolloutCorrection
from dapo_jax.train_step import Batch, NonFiniteError, Trainer

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


def _clock(t_step: float, cpu_step: float) -> dict[str, float]:
  """The step's seconds so far, and the cores the process kept busy in them (all its threads: the sampler's too,
  the bound any overlap of sampling and training works against)."""
  wall = time.perf_counter() - t_step
  return {"timing_s/step": wall, "perf/cpu_cores": (time.process_time() - cpu_step) / wall}


def _timed(timings: dict, name: str):
  """Adds the block's seconds to timings["timing_s/<name>"]."""
  class _T:
    def __enter__(self):
      self.t = time.perf_counter()

    def __exit__(self, *exc):
      timings[f"timing_s/{name}"] = timings.get(f"timing_s/{name}", 0.0) + time.perf_counter() - self.t
  return _T()


@jax.jit
def _tokens_where(known, carried, old):
  return jnp.where(known > 0, carried, old)


@jax.jit
def _probs_diff(sampler_logp, old_logp, mask):
  """|p_sampler - p_old| over the loss tokens (the reference's training/rollout_probs_diff_*): how far the
  sampler's probabilities are from those the update's clip is centred on."""
  mask = mask > 0
  diff = jnp.where(mask, jnp.abs(jnp.exp(sampler_logp) - jnp.exp(old_logp)), 0.0)
  return {"training/rollout_probs_diff_max": jnp.max(diff),
          "training/rollout_probs_diff_mean": jnp.sum(diff) / jnp.maximum(jnp.sum(mask), 1)}


def update_batch(batch: ScoredBatch, adv_B, loss_mask_BxN, rows: int) -> Batch:
  """The update's host batch: the kept rows with their advantages and loss mask, padded to `rows` rows
  (fewer kept groups than the batch, `on_exhausted="train_on_kept"`: see `dynamic_sampling.pad_rows`). Its
  old log-probs start as the sampler's (`actor.reuse_sampler_logprobs`), and are recomputed otherwise."""
  return pad_rows(Batch(batch.prompt_BxP, batch.prompt_mask_BxP, batch.tokens_BxN,
                        np.asarray(loss_mask_BxN, np.float32), batch.sampler_logp_BxN,
                        np.asarray(adv_B, np.float32)), rows)


def behaviour_logprobs(trainer: Trainer, params, sharded, batch: ScoredBatch, layout, rows: int):
  """`sharded` (in `layout`) with the old log-probs of the weights that sampled each row: `params` (this
  step's) for the rows sampled now, the kept ones for the rows carried in from an earlier step; and how far
  they are from the sampler's (`training/rollout_probs_diff_*`)."""
  old = trainer.logprobs(params, sharded)
  if batch.old_logp_known_B.any():
    width = batch.tokens_BxN.shape[1]
    known_BxN = np.zeros((rows, width), np.float32)
    known_BxN[:batch.num_rows] = batch.old_logp_known_B[:, None]
    carried_BxN = np.zeros((rows, width), np.float32)
    carried_BxN[:batch.num_rows] = batch.old_logp_BxN
    old = _tokens_where(layout.token_field(known_BxN), layout.token_field(carried_BxN), old)
  diff = _probs_diff(sharded.old_logp, old, sharded.loss_mask)
  return sharded.with_old_logp(jax.block_until_ready(old)), diff


def corrected_batch(trainer: Trainer, correction: RolloutCorrection, host_batch: Batch, sharded, layout):
  """The update's batch with the rollout correction (`rollout_correction.py`) applied: the sampler's
  log-probs (the host batch's old log-probs until now) against the trainer's just computed; the rows are laid
  out anew, as rejection may leave rows out. (sharded, layout, metrics)."""
  old_BxN = layout.rows(sharded.old_logp)
  weight_BxN, mask_BxN, metrics = correction.apply(old_BxN, host_batch.old_logp_BxN, host_batch.mask_BxN)
  host_batch = host_batch._replace(mask_BxN=mask_BxN, old_logp_BxN=old_BxN.astype(np.float32),
                                   is_weight_BxN=weight_BxN)
  layout = trainer.layout(host_batch)
  return layout.shard(host_batch), layout, metrics


def _carried_logprobs_fn(trainer: Trainer, params, rows: int):
  """The log-probs of a carried part's rows under `params` ([rows, N] on the host), in the update's layout."""
  def logprobs(part: ScoredBatch) -> np.ndarray:
    b = update_batch(part, np.zeros(part.num_rows), part.mask_BxN, rows)
    layout = trainer.layout(b)
    return layout.rows(trainer.logprobs(params, layout.shard(b)))
  return logprobs


def reference_policy(trainer: Trainer, state, workdir: Path, fresh: bool):
  """The KL term's frozen reference: a copy of the starting weights, kept in `workdir/reference_policy` (a
  resumed run reads it back; the checkpoint of step 0 may be gone)."""
  path = workdir / "reference_policy"
  if fresh:
    if distributed.is_main() and path.exists():
      shutil.rmtree(path)  # left by a run that failed before its first checkpoint
    distributed.barrier("clear reference policy")
    ref = trainer.copy_params(state.params)
    ckpt_lib.save_tree(path, ref)
    return ref
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: the reference policy of this run's KL term (actor.kl_coef > 0) is missing; "
                            f"it is written when the run starts")
  return ckpt_lib.restore_tree(path, state.params)


def step_metrics(batch: ScoredBatch, step: int, adv_B, loss_mask_BxN, actor: dict, timings: dict) -> dict[str, float]:
  """The update's metrics under the reference's names: the trained batch's rewards, advantages, lengths, the
  update's own, its timings, and how stale its tokens are (`rollout/staleness`: updates between the weights
  that sampled a token and those it trains; `rollout/tokens_at_staleness_k`: the batch's tokens by it)."""
  known_BxN = batch.mask_BxN & (batch.version_BxN >= 0)
  stale_T = step - batch.version_BxN[known_BxN]
  metrics = {**{k: float(v) for k, v in actor.items()},
             **metrics_lib.summary("critic/score", batch.reward_B),
             **metrics_lib.token_summary("critic/advantages", adv_B, batch.mask_BxN),
             **metrics_lib.summary("response_length", batch.lengths_B),
             **metrics_lib.summary("prompt_length", batch.prompt_len_B),
             "critic/acc/mean": float(batch.acc_B.mean()),
             "response_length/clip_ratio": float(batch.truncated_B.mean()),
             "critic/overlong_penalty/mean": float(batch.penalty_B.mean()),
             "rollout/staleness/mean": float(stale_T.mean()) if stale_T.size else float("nan"),
             "rollout/staleness/max": float(stale_T.max()) if stale_T.size else float("nan"),
             **{f"rollout/tokens_at_staleness_{k}": float(n) for k, n in enumerate(np.bincount(stale_T))}, **timings}
  metrics["perf/update_tokens_per_s"] = (float(np.sum(loss_mask_BxN)) /
                                         max(timings.get("timing_s/update_actor", 1e-9), 1e-9))
  return metrics


def sample_batch(rollouts: Rollouts, policy, iterator, accumulator: GroupAccumulator, strategy, step: int,
                 version: int, base_key, config, checkpointer, cancelled=lambda: False) -> off_policy.Generated:
  """prompt -> rollout -> reward -> filter: step `step`'s batch, sampled by `policy` (weights `version`), until
  the kept groups fill it. Group ids are unique within the run (the step, then the group's place among the
  step's prompts); a group samples with fold_in(step's key, its id). `cancelled()` ends it early (the run is
  stopping)."""
  timings = {}
  prompts = strategy.gen_batch_prompts
  rng = jax.random.fold_in(base_key, step)
  # With the filter off every group is kept: the batch is one generation batch, nothing to stream for.
  if config.rollout.get("streaming", False) and strategy.enable:
    sampled, decoded, dropped, extra = _stream_groups(rollouts, policy, iterator, accumulator, strategy, prompts,
                                                      rng, step, version, timings, config, checkpointer, cancelled)
  else:
    sampled = []
    while not accumulator.ready:
      if cancelled():
        raise off_policy.Cancelled
      gen_index = len(sampled)
      # Each process reads its share of the prompts; the ids are exchanged to form the global batch.
      prompt_rows = distributed.gather_list(iterator.next_batch(prompts))
      sampled.append(rollouts(policy, prompt_rows, rng, first_group=step * 2**24 + gen_index * prompts,
                              timings=timings, version=version))
      _check_finite_rollout(sampled[-1], step + 1, config, checkpointer)  # before the filter reads it
      accumulator.add(sampled[-1])
    decoded, dropped, extra = sum(int(s.lengths_B.sum()) for s in sampled), 0, {}
  batch, metrics = accumulator.take()
  metrics.update(extra)
  lengths_B = np.concatenate([s.lengths_B for s in sampled] or [np.zeros(0)])
  metrics.update({
      "train/dropped_groups": float(dropped),
      "train/decoded_tokens_per_trained_token": decoded / max(float(batch.lengths_B.sum()), 1.0),
      # A step whose groups were all carried in (carry_over) samples nothing.
      "rollout/acc/mean": float(np.concatenate([s.acc_B for s in sampled]).mean()) if sampled else float("nan"),
      "rollout/weight_version": float(version),
      "reward/timeouts": float(sum(int(s.timeout_B.sum()) for s in sampled)),
      "perf/gen_tokens_per_s": float(lengths_B.sum()) / max(timings.get("timing_s/gen", 0.0), 1e-9), **timings})
  return off_policy.Generated(step, version, batch, metrics)


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
    # The whole config as it ran this time (notebooks and `runs.load_run` rebuild the run from it).
    (workdir / "run_config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def _check_memory(config, mesh, rollout_mesh):
  device_gib = memory.device_gib_for(config)
  groups = memory.estimates_for_config(config, tasks.model_config(config), dict(mesh.shape),
                                       None if rollout_mesh is mesh else dict(rollout_mesh.shape), device_gib)
  if distributed.is_main():
    for name, estimate in groups.items():
      print(f"memory per device ({name}, estimate):\n{estimate.table()}")
  for name, estimate in groups.items():
    if not estimate.fits:
      raise config_lib.ConfigValidationError(
          f"config does not fit: the estimated peak of {estimate.peak / memory.GIB:.1f} GiB per device ({name}) "
          f"exceeds 90% of {device_gib:.1f} GiB (hardware.device_memory_gib={config.hardware.device_memory_gib}, or "
          f"less if the device reports less); use more devices (mesh, mesh.rollout_devices), smaller micro-batches "
          f"(actor.micro_batch_size), generation batches or fewer decode slots (rollout.engine.slots)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains with DAPO per `config`, writing metrics, checkpoints and plots to `workdir`; returns the last
  evaluation's metrics."""
  if "://" in str(workdir):
    # Path() would turn gs://b/x into a local ./gs:/b/x on every worker: each would write its own.
    raise ValueError(f"--workdir={workdir}: URLs are not supported; give a path every process can reach (a shared "
                     f"disk, or the bucket mounted with gcsfuse, e.g. /mnt/gcs/runs/x)")
  workdir = Path(workdir).absolute()
  mesh, rollout_mesh = config_lib.meshes(config)  # training, sampling (the same mesh unless split)
  config_lib.validate(config, mesh, rollout_mesh)  # before anything is built, compiled or written
  _check_memory(config, mesh, rollout_mesh)
  workdir.mkdir(parents=True, exist_ok=True)
  _check_workdir_config(workdir, config)
  is_main = distributed.is_main()
  base_key = jax.random.key(config.seed)
  r = config.rollout
  g = r.group_size

  task = tasks.build(config, workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=config.checkpoint.keep,
                                       asynchronous=config.checkpoint.asynchronous)
  with contextlib.ExitStack() as cleanup:
    # Whatever ends the run, the checkpoints it started finish writing and the logs are flushed.
    cleanup.callback(checkpointer.close)
    model = tasks.build_policy(config, task, mesh)
    trainer = Trainer(model, config_lib.update_config(config), mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(trainer.init_state, model), trainer.state_shardings)
    strategy = config_lib.dynamic_sampling(config)
    accumulator = GroupAccumulator(strategy, g)
    overlong = config_lib.overlong(config)
    correction = config_lib.rollout_correction(config)
    iterator = task.train_iterator(config.seed)
    restored = checkpointer.restore_latest(abstract)
    with jax.set_mesh(mesh):
      if restored is None:
        model = tasks.warm_start(config, task, model, mesh, workdir)
        state = trainer.init_state(model)
        step = 0
        # Written before checkpoint 0: a run that has a checkpoint has its reference policy.
        ref_params = reference_policy(trainer, state, workdir, fresh=True) if trainer.cfg.kl_coef else None
        checkpointer.save(0, state, {"data": iterator.state(), "carry": accumulator.state()}, wait=True)
      else:
        step, state, record = restored
        iterator.restore(record["data"])
        accumulator.restore(record["carry"])
        logging.info("resumed from %s at step %d", checkpointer.directory, step)
        if is_main:
          print(f"resumed from checkpoint step {step}")
        ref_params = reference_policy(trainer, state, workdir, fresh=False) if trainer.cfg.kl_coef else None
    log = config.log
    wandb = ({"project": log.get("wandb_project", "dapo_jax"), "mode": log.get("wandb_mode", ""),
              "config": config.to_dict()} if log.get("wandb", False) else None)
    writer = MetricWriter(workdir, enabled=is_main, resume_from=None if restored is None else step, wandb=wandb)
    cleanup.callback(writer.close)
    if restored is not None:
      _recover_step_log(writer, workdir, step, record, is_main)

    last_eval: dict[str, float] = {}
    prompts = strategy.gen_batch_prompts
    if prompts != r.gen_batch_size:
      logging.info("dynamic sampling is off: generation batches of rollout.train_batch_size=%d prompts (every group "
                   "is kept), not rollout.gen_batch_size=%d", prompts, r.gen_batch_size)
    rows = r.train_batch_size * g  # the update's rows
    progress = Progress(config.total_steps, step, enabled=config.log.progress and is_main)
    staleness = int(r.get("max_staleness", 0))
    # The sampler scores with its own reward workers when it runs beside the trainer's evaluations.
    sampler_executor = config_lib.reward_executor(config) if staleness else contextlib.nullcontext(None)
    with config_lib.reward_executor(config) as executor, sampler_executor as sampler_executor, _Stop() as stop, \
        jax.set_mesh(mesh), contextlib.ExitStack() as sampler_cleanup:
      rollouts = Rollouts(task.tokenizer, sampler_executor or executor,
                          config_lib.sampling_params(config, task.tokenizer), num_samples=g,
                          engine=config_lib.engine_config(config), overlong=overlong)
      sampler = off_policy.Sampler(
          lambda at_step, policy, version: sample_batch(rollouts, policy, iterator, accumulator, strategy, at_step,
                                                        version, base_key, config, checkpointer,
                                                        lambda: sampler.cancelled),
          threaded=staleness > 0, mesh=rollout_mesh)
      sampler_cleanup.callback(sampler.close)
      weight_sync = off_policy.WeightSync(trainer.graphdef, abstract.params, mesh, rollout_mesh,
                                          concurrent=staleness > 0)
      partial_rollouts = bool(r.get("partial_rollouts", False))
      if restored is not None:
        sampler.preload([off_policy.Generated.from_record(x) for x in record.get("ahead", [])])
        rollouts.unfinished = [PartialGroup.from_record(x) for x in record.get("partial", [])]
      # On a threaded sampler's side of several processes, the trainer's host exchanges get a channel too.
      trainer_channel = distributed.channel("trainer") if staleness and jax.process_count() > 1 else \
          contextlib.nullcontext()
      sampler_cleanup.enter_context(trainer_channel)

      def evaluate(at_step):
        return evaluate_task(trainer.model(state), task, config, jax.random.fold_in(base_key, 10**9 + at_step),
                             executor)

      if step == 0 and config.eval.before_train:
        last_eval = evaluate(0)
        writer.write(0, last_eval)
        if is_main:
          print(f"step 0: held-out avg@{config.eval.k} {last_eval['val/acc/mean']:.3f}")
      stopping = False
      while step < config.total_steps and not stopping:
        timings = {}
        t_step, cpu_step = time.perf_counter(), time.process_time()

        # The sampler gets these weights for the batches they sample (step + staleness; at the start of a run
        # also the ones before it), and this step's batch is taken as soon as it is ready.
        policy = None
        for ahead in range(step, min(step + staleness, config.total_steps - 1) + 1):
          if sampler.has(ahead):
            continue
          if off_policy.version_for(ahead, staleness) != step:
            # A checkpoint of a run that had ended (a longer run continues it) holds no batches beyond its end.
            logging.warning("step %d's batch is sampled with the weights of step %d (the checkpoint holds no batch "
                            "sampled ahead for it)", ahead, step)
          policy = policy or weight_sync(state.params, timings)
          sampler.submit(ahead, policy, version=step)
        generated = sampler.result(step, timings)
        batch, ds_metrics = generated.batch, dict(generated.metrics)

        # advantage, and the loss mask of overlong filtering
        with _timed(timings, "adv"):
          adv_B = group_advantages(batch.reward_B, g)
          loss_mask_BxN = batch.mask_BxN * overlong.loss_mask(batch.truncated_B)[:, None]
          host_batch = update_batch(batch, adv_B, loss_mask_BxN, rows)
          layout = trainer.layout(host_batch)  # packed into token-budget micro-batches, or padded
          sharded = layout.shard(host_batch)
          ds_metrics["perf/update_token_fill"] = layout.fill(host_batch)
        if not config.actor.reuse_sampler_logprobs:
          with _timed(timings, "old_log_prob"):
            sharded, diff = behaviour_logprobs(trainer, state.params, sharded, batch, layout, rows)
            ds_metrics.update(distributed.to_host(diff))
            if not staleness:
              # The groups carried into the next step get theirs now, while these weights exist (sampled ahead,
              # they are sampled by older weights: their old log-probs are their own step's, as every row's).
              accumulator.compute_carried_logprobs(_carried_logprobs_fn(trainer, state.params, rows), rows)
        if correction.enabled:
          with _timed(timings, "rollout_corr"):
            sharded, layout, corr_metrics = corrected_batch(trainer, correction, host_batch, sharded, layout)
            ds_metrics.update(corr_metrics)
        if ref_params is not None:
          with _timed(timings, "ref"):
            sharded = sharded.with_ref_logp(jax.block_until_ready(trainer.logprobs(ref_params, sharded)))

        # loss -> update
        with _timed(timings, "update_actor"):
          state, actor = trainer.update(state, sharded)
          actor = distributed.to_host(actor)
        step += 1
        _check_finite_update(actor, step, config, checkpointer)  # before this step's state is saved
        metrics = {**ds_metrics, **step_metrics(batch, step - 1, adv_B, loss_mask_BxN, actor, timings)}

        if config.eval.every and (step % config.eval.every == 0 or step == config.total_steps):
          with _timed(metrics, "testing"):
            last_eval = evaluate(step)
          metrics.update(last_eval)

        # checkpoint. The flag is read once a step, and agreed by all processes: the checkpoint here and the
        # loop's exit follow the same reading (read twice, a signal between the reads ended the run one step past
        # its last checkpoint), and no process stops while another goes on into the next step's collectives.
        stopping = stop.agreed()
        every = config.checkpoint.every  # 0: only at the end and on a stop
        sample_lines = _sample_lines(step, batch, config.log.samples_per_step)
        if (every and step % every == 0) or step == config.total_steps or stopping:
          # The step's log rows go into the checkpoint too: a run killed after the save but before it wrote
          # them gets them back when it resumes here (`_recover_step_log`).
          row = {k: float(v) for k, v in metrics.items()}
          log = {"metrics": json.dumps({**row, **_clock(t_step, cpu_step)}),
                 "samples": sample_lines}
          with _timed(metrics, "save_checkpoint"):
            # The batches sampled ahead first: the data position and the carry are those after them.
            ahead = [x.to_record() for x in sampler.pending()]
            partial = [pg.to_record() for pg in rollouts.unfinished] if partial_rollouts else []
            checkpointer.save(step, state, {"data": iterator.state(), "carry": accumulator.state(), "ahead": ahead,
                                            "partial": partial, "log": log}, wait=stopping)
        metrics.update(_clock(t_step, cpu_step))
        writer.write(step, metrics)
        if is_main and sample_lines:
          with open(workdir / "samples.jsonl", "a") as f:
            f.writelines(sample_lines)
        progress.update(step, metrics, {"val/acc/mean": "val_acc", "rollout/acc/mean": "acc",
                                        "critic/score/mean": "score", "actor/entropy": "entropy"})

  if is_main:
    plot_run(workdir)
  return last_eval


def _stream_groups(rollouts: Rollouts, policy, iterator, accumulator: GroupAccumulator, strategy, prompts: int,
                   rng, step: int, version: int, timings: dict, config, checkpointer, cancelled
                   ) -> tuple[list[ScoredBatch], int, int, dict[str, float]]:
  """Streaming dynamic sampling: the engine pulls prompts (generation batches of `prompts`, at most
  `max_num_gen_batches` of them; the next one as soon as the groups kept and in flight cannot fill the batch)
  as its slots free up; finished groups are scored while decoding goes on and reach the filter in prompt
  order; decoding stops once the batch is full, and the groups in flight are dropped. The data iterator is then put back to the end of the generation batch holding the group that
  filled the batch: later prompts were only looked ahead at and come again next step. So the trained batch,
  and the data a step consumes, are those of whole generation batches (`rollout.streaming=False`). Returns
  (scored parts, tokens decoded, groups dropped, partial rollouts' metrics)."""
  states = []  # the iterator before each generation batch of prompts
  sampled, considered = [], 0  # groups the filter has seen, up to the one that filled the batch
  partial = config.rollout.get("partial_rollouts", False)
  carried = rollouts.unfinished if partial else []  # the groups the last step left unfinished come first

  def prompt_rows():
    limit = strategy.max_num_gen_batches
    while not limit or len(states) < limit:
      # The next generation batch only once the groups kept and those still decoding cannot fill the batch:
      # whole generation batches would need it too, so streaming decodes no group they would not.
      while accumulator.kept_groups + len(carried) + len(states) * prompts - considered >= strategy.train_batch_size:
        yield None
      states.append(iterator.state())
      # Each process reads its share of the prompts; the ids are exchanged to form the global batch.
      yield from distributed.gather_list(iterator.next_batch(prompts))

  stream = rollouts.stream(policy, prompt_rows(), rng, first_group=step * 2**24, timings=timings, version=version,
                           carried=carried)
  try:
    for part in stream:
      if cancelled():
        raise off_policy.Cancelled
      sampled.append(part)
      _check_finite_rollout(part, step + 1, config, checkpointer)  # before the filter reads it
      kept_before = accumulator.kept_groups
      accumulator.add(part, streaming=True)
      if accumulator.ready:
        keep_G = keep_groups(strategy.metric_B(part), rollouts.num_samples) if strategy.enable else \
            np.ones(part.num_rows // rollouts.num_samples, bool)
        considered += int(np.argmax(kept_before + np.cumsum(keep_G) >= strategy.train_batch_size)) + 1
        break
      considered += part.num_rows // rollouts.num_samples
  finally:
    stream.close()
  # Partial rollouts: every prompt pulled is filtered now or continues next step (`rollouts.unfinished`).
  # Otherwise the prompts after the generation batch that filled the batch are read again next step.
  used = -(-considered // prompts) if accumulator.ready and not partial else len(states)
  if used < len(states):
    iterator.restore(states[used])
  if not accumulator.ready:
    accumulator.end_of_stream(used)
  accumulator.num_gen_batches = used
  stats = rollouts.engine.stats
  if not partial:
    return sampled, stats.decoded_tokens, stats.dropped_groups, {}
  return sampled, stats.decoded_tokens, 0, {
      "rollout/partial/continued_groups": float(len(carried)),
      "rollout/partial/continued_tokens": float(sum(len(t) for pg in carried for t in pg.tokens)),
      "rollout/partial/unfinished_groups": float(len(rollouts.unfinished))}


def _diverged(step: int, what: str, config, checkpointer) -> NonFiniteError:
  steps = checkpointer.steps()
  newest = (f"The newest checkpoint is step {steps[-1]} in {checkpointer.directory} (written before this step; "
            f"if the weights went bad in its update, resume from an earlier one: delete the later step "
            f"directories)") if steps else "No checkpoint was written"
  return NonFiniteError(
      f"step {step}: {what}; the run stops rather than train on NaN. Likely cause: a learning rate too high for "
      f"this model (actor.lr={config.actor.lr:g}; try --config.actor.lr={config.actor.lr / 10:g}), or bf16 "
      f"overflow (model.dtype). {newest}.")


def _check_finite_rollout(batch: ScoredBatch, step: int, config, checkpointer) -> None:
  """Non-finite log-probs of the sampled tokens mean non-finite logits: the weights no longer work."""
  bad = ~np.isfinite(batch.sampler_logp_BxN) & batch.mask_BxN
  if bad.any():
    raise _diverged(step, f"the policy's log-probs of {int(bad.sum())} of {int(batch.mask_BxN.sum())} sampled "
                    f"tokens are not finite (NaN or inf logits)", config, checkpointer)


def _check_finite_update(actor: dict, step: int, config, checkpointer) -> None:
  if not actor["actor/params_finite"]:
    raise _diverged(step, "the weights are not finite after the update", config, checkpointer)
  if actor["actor/applied_updates"] == 0 and actor["actor/skipped_updates"] > 0:
    raise _diverged(step, f"all {int(actor['actor/skipped_updates'])} updates were skipped: their gradients or "
                    f"updated weights were not finite (actor/grad_norm={actor['actor/grad_norm']})", config,
                    checkpointer)


def _sample_lines(step: int, batch: ScoredBatch, n: int) -> list[str]:
  """`samples.jsonl` lines for the first `n` responses of the step's batch."""
  return [json.dumps(r) + "\n" for r in metrics_lib.sample_records(step, batch, n)]


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