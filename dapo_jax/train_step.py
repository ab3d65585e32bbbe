"""The DAPO update: one pure jitted step `(state, batch) -> (state, metrics)` over the mesh.

A rollout batch arrives split into mini-batches (one AdamW update each; the paper: 512 prompts x 16 responses
in 16 mini-batches) and micro-batches (gradient accumulation for memory). Packed (`max_tokens_per_micro_batch`,
the default of the configs), the rows are packed into micro-batches of at most that many tokens per device group,
[M, K, R, L] (`packing.py`); padded, each row is padded to the prompt and response widths and micro-batches
hold `num_micro_batches` rows, [M, m, b, ...]. Either way the row axis is sharded over the data axes. Inside one jit: a scan over mini-batches, and in each a scan over
micro-batches whose losses are normalised by the *mini-batch* totals, so the accumulated gradient is the
mini-batch gradient however it is split, and on however many devices (`loss.py`).

Optimizer as the reference: AdamW (betas 0.9/0.999, eps 1e-8, weight decay on every parameter), learning
rate `lr * t / warmup` (then `lr`) for rollout step t = 0, 1, ... (so the first step trains with lr 0, as
verl's constant-with-warmup schedule), global-norm clipping, and an update whose gradient norm is not finite
is skipped and counted. No KL term unless `kl_coef > 0`: then the batch carries the log-probs of a frozen
reference policy (`ref_logp_BxN`, from `Trainer.logprobs` on `Trainer.copy_params` of the starting weights)
and the loss adds `kl_coef` times their low-variance KL (`loss.low_var_kl`), as the reference's KL loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dapo_jax import loss as loss_lib
from dapo_jax import distributed, sharding
from dapo_jax.packing import PackedBatch, Packer, PackPlan
from dapo_jax.model.transformer import Transformer


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateConfig:
  lr: float = 1e-6
  warmup_steps: int = 10
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0
  clip_low: float = 0.2
  clip_high: float = 0.28
  clip_c: float = 10.0
  loss_agg: str = "token-mean"
  norm_len: int = 0  # seq-mean-token-sum-norm's constant; 0: the response width
  temperature: float = 1.0  # the sampling temperature: log-probs come from logits / T
  num_mini_batches: int = 1
  num_micro_batches: int = 1
  kl_coef: float = 0.0  # > 0: low-variance KL to a frozen reference model (GRPO baselines; DAPO uses 0)
  entropy_coef: float = 0.0
  max_tokens_per_micro_batch: int = 0  # > 0: packed micro-batches of this many tokens per device group

  def __post_init__(self):
    # Each message starts with the field's name (config_lib names the config field it came from).
    if self.loss_agg not in loss_lib.AGG_MODES:
      raise ValueError(f"loss_agg: {self.loss_agg!r} is not one of {loss_lib.AGG_MODES}")
    if not 0.0 <= self.clip_low < 1.0:
      raise ValueError(f"clip_low: must be in [0, 1), got {self.clip_low}")
    if not self.clip_high >= 0.0:
      raise ValueError(f"clip_high: must be >= 0, got {self.clip_high}")
    if not self.clip_c > 1.0:
      raise ValueError(f"clip_c: the dual-clip constant must be > 1, got {self.clip_c}")
    if not isinstance(self.max_tokens_per_micro_batch, int) or self.max_tokens_per_micro_batch < 0:
      raise ValueError(f"max_tokens_per_micro_batch: must be an integer >= 0 (0: padded micro-batches), "
                       f"got {self.max_tokens_per_micro_batch!r}")
    for name in ("num_mini_batches", "num_micro_batches"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
    for name in ("lr", "weight_decay", "kl_coef"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"warmup_steps: must be an integer >= 0, got {self.warmup_steps!r}")
    if not self.grad_clip > 0:
      raise ValueError(f"grad_clip: must be > 0 (the global-norm bound), got {self.grad_clip}")
    if not self.temperature > 0:
      raise ValueError(f"temperature: must be > 0, got {self.temperature}")


class Batch(NamedTuple):
  """A rollout batch for the update, rows prompt-major. `mask_BxN` is the loss mask: the response tokens,
  with overlong-filtered rows zeroed."""
  prompt_BxP: Any
  prompt_mask_BxP: Any
  tokens_BxN: Any
  mask_BxN: Any
  old_logp_BxN: Any
  adv_B: Any
  ref_logp_BxN: Any = None
  is_weight_BxN: Any = None  # the rollout correction's importance weights (`rollout_correction.py`)

  @property
  def old_logp(self):
    return self.old_logp_BxN

  @property
  def loss_mask(self):
    return self.mask_BxN

  def with_old_logp(self, x) -> "Batch":
    return self._replace(old_logp_BxN=x)

  def with_ref_logp(self, x) -> "Batch":
    return self._replace(ref_logp_BxN=x)


def lr_at(cfg: UpdateConfig, step) -> jax.Array:
  """transformers' constant schedule with warmup, stepped once per rollout step: step/warmup, then 1."""
  return cfg.lr * jnp.where(step < cfg.warmup_steps, step / max(1, cfg.warmup_steps), 1.0)


def _base_tx(cfg: UpdateConfig) -> optax.GradientTransformation:
  # AdamW with the learning rate applied outside, so the schedule can follow rollout steps.
  return optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                     optax.add_decayed_weights(cfg.weight_decay))


def sequence_logprobs(model: Transformer, prompt_BxP, prompt_mask_BxP, tokens_BxN, resp_mask_BxN,
                      temperature: float, with_logits: bool = False):
  """log p(token) of each response token under log_softmax(logits / T), teacher-forced; (logp_BxN, logits)."""
  p = prompt_BxP.shape[1]
  full = jnp.concatenate([prompt_BxP, tokens_BxN], axis=1)
  # A response is every token up to its last masked one (a loss mask may have gaps: rejected tokens), as
  # the packed update reads it.
  resp_BxN = jnp.flip(jnp.cumsum(jnp.flip(resp_mask_BxN.astype(jnp.int32), -1), -1), -1) > 0
  mask = jnp.concatenate([prompt_mask_BxP.astype(bool), resp_BxN], axis=1)
  logits_BxNxV = model(full, attn_mask_BxT=mask)[:, p - 1:-1] / temperature
  logp_BxN = jnp.take_along_axis(jax.nn.log_softmax(logits_BxNxV, axis=-1), tokens_BxN[..., None], axis=-1)[..., 0]
  return logp_BxN, (logits_BxNxV if with_logits else None)


def packed_logprobs(model: Transformer, mb: PackedBatch, temperature: float, with_logits: bool = False):
  """`sequence_logprobs` of a packed micro-batch ([R, L] fields): at each position, log p of the token its
  logits score (`target_RxL`); (logp_RxL, logits)."""
  logits_RxLxV = model(mb.tokens_RxL, positions_BxT=mb.position_RxL, segment_BxT=mb.segment_RxL) / temperature
  logp_RxL = jnp.take_along_axis(jax.nn.log_softmax(logits_RxLxV, axis=-1), mb.target_RxL[..., None], axis=-1)[..., 0]
  return logp_RxL, (logits_RxLxV if with_logits else None)


def _micro_batches(mini):
  """A mini-batch's micro-batch axis to scan over, its loss totals, and whether a micro-batch holds a row
  (None: always)."""
  if isinstance(mini, PackedBatch):
    micro = mini._replace(num_tokens_M=None, num_seqs_M=None, norm_len_M=None)
    return micro, (mini.num_tokens_M, mini.num_seqs_M, mini.norm_len_M), lambda mb: jnp.any(mb.segment_RxL > 0)
  totals = (jnp.sum(mini.mask_BxN.astype(jnp.float32)), loss_lib.count_sequences(mini.mask_BxN), None)
  return mini, totals, None


class NonFiniteError(FloatingPointError):
  """The run's weights, log-probs or updates stopped being finite: it stops rather than train on NaN."""


def all_finite(tree) -> jax.Array:
  """True iff every element of every floating leaf is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class TrainState(NamedTuple):
  params: Any  # nnx.State of the policy's Params
  opt: Any
  step: jax.Array  # rollout steps done
  updates: jax.Array  # optimizer updates applied
  skipped: jax.Array  # updates skipped for a non-finite gradient norm


def _opt_shardings(abs_opt, abs_params, param_shardings, mesh):
  """Optimizer leaves that mirror a parameter (Adam's mu, nu) take its sharding; the rest are replicated."""
  by_path = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abs_params)[0]:
    by_path[tuple(path)] = leaf.shape
  shard_by_path = {tuple(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      tail = path[start:]
      if tail in by_path and by_path[tail] == leaf.shape:
        return shard_by_path[tail]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abs_opt)


class Trainer:
  """Holds the jitted functions for one (model config, update config, mesh).

      trainer = Trainer(model, update_cfg, mesh)        # model: a sharded Transformer
      state = trainer.init_state(model)
      state, metrics = trainer.update(state, trainer.shard_batch(batch))
  """

  def __init__(self, model: Transformer, cfg: UpdateConfig, mesh: Mesh):
    self.cfg, self.mesh = cfg, mesh
    self.graphdef, params = nnx.split(model)
    abs_params = jax.eval_shape(lambda x: x, params)
    self.model_cfg = model.cfg
    self.param_shardings = sharding.state_shardings(abs_params, mesh)
    abs_opt = jax.eval_shape(_base_tx(cfg).init, abs_params)
    replicated = NamedSharding(mesh, P())
    self.state_shardings = TrainState(self.param_shardings,
                                      _opt_shardings(abs_opt, abs_params, self.param_shardings, mesh),
                                      replicated, replicated, replicated)
    self._init = jax.jit(self._init_impl, out_shardings=self.state_shardings)
    self.update = jax.jit(self._update_impl, in_shardings=(self.state_shardings, None),
                          out_shardings=(self.state_shardings, None), donate_argnums=(0,))
    self.logprobs = jax.jit(self._logprobs_impl)
    # A copy that no update's donation can delete: the frozen reference policy of a KL term.
    self.copy_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.param_shardings)

  # --- state ---

  def _init_impl(self, params):
    return TrainState(params, _base_tx(self.cfg).init(params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                      jnp.zeros((), jnp.int32))

  def init_state(self, model: Transformer) -> TrainState:
    return self._init(nnx.state(model))

  def model(self, state: TrainState) -> Transformer:
    return nnx.merge(self.graphdef, state.params)

  # --- batches ---

  def layout(self, batch: Batch) -> "Layout":
    """Where a host batch's rows go in the update: packed when `max_tokens_per_micro_batch` is set."""
    if not self.cfg.max_tokens_per_micro_batch:
      return PaddedLayout(self)
    packer = Packer(self.cfg.max_tokens_per_micro_batch, data=sharding.batch_shards(self.mesh),
                    num_mini_batches=self.cfg.num_mini_batches)
    return PackedLayout(self, packer.plan(batch.prompt_mask_BxP, batch.mask_BxN))

  def shard_batch(self, batch: Batch) -> Batch | PackedBatch:
    """A host batch [B, ...] on the devices in the update's layout (`layout`)."""
    return self.layout(batch).shard(batch)

  def shard_rows(self, x):
    """One host array [B, ...] laid out [M, m, b, ...] as the padded layout lays out a batch's fields (None
    stays None): consecutive rows form a mini-batch, each micro-batch spread over the data axes."""
    if x is None:
      return None
    cfg = self.cfg
    x = np.asarray(x)
    b_total = x.shape[0]
    split = cfg.num_mini_batches * cfg.num_micro_batches
    if b_total % split:
      raise ValueError(f"update: batch of {b_total} rows does not split into {cfg.num_mini_batches} mini-batches "
                       f"x {cfg.num_micro_batches} micro-batches")
    return self._shard_micro(x.reshape((cfg.num_mini_batches, cfg.num_micro_batches, b_total // split)
                                       + x.shape[1:]))

  def _shard_micro(self, x):
    """[M, m-or-K, rows, ...] with the rows over the data axes; [M] totals replicated."""
    if x is None:
      return None
    x = np.asarray(x)
    names = (None,) if x.ndim == 1 else (None, None, "batch") + (None,) * (x.ndim - 3)
    spec = sharding.logical_to_spec(names, x.shape, self.mesh)
    return distributed.to_global(x, NamedSharding(self.mesh, spec))

  # --- log-probs ---

  def _logprobs_impl(self, params, batch):
    """Per-token log-probs of a batch, one micro-batch at a time (memory), in the batch's layout."""
    model = nnx.merge(self.graphdef, params)
    if isinstance(batch, PackedBatch):
      micro, _, live = _micro_batches(batch)
      flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), micro)

      def packed(mb):
        zeros = jnp.zeros(mb.tokens_RxL.shape, jnp.float32)
        return jax.lax.cond(live(mb), lambda: packed_logprobs(model, mb, self.cfg.temperature)[0], lambda: zeros)

      return jax.lax.map(packed, flat).reshape(batch.tokens_RxL.shape)

    def one(args):
      prompt, pmask, tokens, rmask = args
      return sequence_logprobs(model, prompt, pmask, tokens, rmask, self.cfg.temperature)[0]

    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    xs = (flat(batch.prompt_BxP), flat(batch.prompt_mask_BxP), flat(batch.tokens_BxN), flat(batch.mask_BxN) > 0)
    out = jax.lax.map(one, xs)
    return out.reshape(batch.tokens_BxN.shape)

  # --- the update ---

  def microbatch_loss(self, params, mb, totals):
    """This micro-batch's share of the mini-batch loss, and its metric shares."""
    cfg = self.cfg
    model = nnx.merge(self.graphdef, params)
    num_tokens, num_seqs, norm_len = totals
    # Logits are kept for the entropy metric, which is always logged.
    if isinstance(mb, PackedBatch):
      logp, logits = packed_logprobs(model, mb, cfg.temperature, with_logits=True)
      old_logp, adv, mask, ref_logp, seq_tokens = (mb.old_logp_RxL, mb.adv_RxL, mb.mask_RxL, mb.ref_logp_RxL,
                                                   mb.seq_tokens_RxL)
      is_weight = mb.is_weight_RxL
    else:
      logp, logits = sequence_logprobs(model, mb.prompt_BxP, mb.prompt_mask_BxP, mb.tokens_BxN, mb.mask_BxN > 0,
                                       cfg.temperature, with_logits=True)
      old_logp, adv, mask, ref_logp, seq_tokens = mb.old_logp_BxN, mb.adv_B, mb.mask_BxN, mb.ref_logp_BxN, None
      is_weight = mb.is_weight_BxN
    norm_len = cfg.norm_len or norm_len
    loss, metrics = loss_lib.policy_loss(
        logp, old_logp, adv, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_c=cfg.clip_c,
        agg=cfg.loss_agg, logits=logits, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len,
        entropy_coef=cfg.entropy_coef, seq_tokens=seq_tokens, is_weight=is_weight)
    if cfg.kl_coef:
      # The reference's KL loss: low_var_kl to the frozen starting policy, aggregated as the policy loss.
      kl_loss = loss_lib.aggregate(loss_lib.low_var_kl(logp, ref_logp), mask, cfg.loss_agg, num_tokens=num_tokens,
                                   num_seqs=num_seqs, norm_len=norm_len, seq_tokens=seq_tokens)
      loss = loss + cfg.kl_coef * kl_loss
      metrics["kl_loss"] = kl_loss
    return loss, metrics

  def minibatch_grads(self, params, mini):
    """Gradient of one mini-batch (its micro-batches stacked on the first axis) accumulated over its
    micro-batches; (loss, grads, metrics)."""
    micro, totals, live = _micro_batches(mini)
    grad_fn = jax.value_and_grad(self.microbatch_loss, has_aux=True)
    first = jax.tree.map(lambda x: x[0], micro)
    out_shapes = jax.eval_shape(lambda: grad_fn(params, first, totals))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), out_shapes)

    def body(acc, mb):
      if live is None:
        out = grad_fn(params, mb, totals)
      else:  # a micro-batch of the power-of-two count that holds no row: no work
        out = jax.lax.cond(live(mb), lambda: grad_fn(params, mb, totals),
                           lambda: jax.tree.map(lambda z, s: z.astype(s.dtype), zeros, out_shapes))
      return jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, out), None

    ((loss, metrics), grads), _ = jax.lax.scan(body, zeros, micro)
    return loss, grads, metrics

  def _update_impl(self, state: TrainState, batch):
    cfg = self.cfg
    tx = _base_tx(cfg)
    lr = lr_at(cfg, state.step)

    def one_update(carry, mini):
      params, opt, updates, skipped = carry
      loss, grads, metrics = self.minibatch_grads(params, mini)
      norm = optax.tree.norm(grads)
      finite = jnp.isfinite(norm)
      # A mini-batch with no loss token (all padding: see `dynamic_sampling.pad_rows`; or every row overlong-filtered) is no
      # update: an optimizer step on zero gradients would still move the weights (momentum, weight decay).
      active = jnp.any(mini.loss_mask > 0)
      scale = jnp.minimum(1.0, cfg.grad_clip / (norm + 1e-6))
      grads = jax.tree.map(lambda g: g * scale, grads)
      step_updates, new_opt = tx.update(grads, opt, params)
      new_params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, step_updates)
      # A finite gradient can still overflow the weights (a huge learning rate, bf16): not applied either.
      finite = finite & all_finite(new_params)
      apply = finite & active
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)  # noqa: E731
      carry = (keep(new_params, params), keep(new_opt, opt), updates + apply.astype(jnp.int32),
               skipped + (~finite).astype(jnp.int32))
      metrics = dict(metrics, grad_norm=norm, loss=loss)
      return carry, (metrics, active)

    (params, opt, updates, skipped), (per_update, active_M) = jax.lax.scan(
        one_update, (state.params, state.opt, state.updates, state.skipped), batch)
    # Averages over the mini-batches that hold loss tokens.
    weight_M = active_M.astype(jnp.float32) / jnp.maximum(jnp.sum(active_M), 1)
    metrics = {f"actor/{k}": jnp.sum(v * weight_M) for k, v in per_update.items()}
    metrics["actor/lr"] = lr
    if cfg.kl_coef:
      metrics["actor/kl_coef"] = jnp.asarray(cfg.kl_coef, jnp.float32)
    metrics["actor/skipped_updates"] = (skipped - state.skipped).astype(jnp.float32)
    metrics["actor/applied_updates"] = (updates - state.updates).astype(jnp.float32)
    metrics["actor/params_finite"] = all_finite(params).astype(jnp.float32)
    return TrainState(params, opt, state.step + 1, updates, skipped), metrics


class PaddedLayout:
  """Rows padded to the batch's widths, [M, m, b, ...]."""

  def __init__(self, trainer: Trainer):
    self.trainer = trainer

  def shard(self, batch: Batch) -> Batch:
    return Batch(*(self.trainer.shard_rows(x) for x in batch))

  def token_field(self, x_BxN):
    """A host array [B, N] of per-response-token values, on the devices as the batch's token fields."""
    return self.trainer.shard_rows(x_BxN)

  def rows(self, x) -> np.ndarray:
    """A token field of this layout (the log-probs) back on the host as [B, N]."""
    x = np.asarray(distributed.to_host(x))
    return x.reshape(-1, x.shape[-1])

  def fill(self, batch: Batch) -> float:
    """The share of the tokens the update computes that are real (prompt and response)."""
    real = np.asarray(batch.prompt_mask_BxP).sum() + (np.asarray(batch.mask_BxN) > 0).sum()
    return float(real) / max(np.asarray(batch.prompt_mask_BxP).size + np.asarray(batch.mask_BxN).size, 1)


class PackedLayout(PaddedLayout):
  """Rows packed into token-budget micro-batches, [M, K, R, L] (`packing.py`)."""

  def __init__(self, trainer: Trainer, plan: PackPlan):
    super().__init__(trainer)
    self.plan = plan

  def shard(self, batch: Batch) -> PackedBatch:
    return PackedBatch(*(self.trainer._shard_micro(x) for x in self.plan.pack(batch)))

  def token_field(self, x_BxN):
    return self.trainer._shard_micro(self.plan.token_field(x_BxN, np.asarray(x_BxN).dtype))

  def rows(self, x) -> np.ndarray:
    return self.plan.rows(np.asarray(distributed.to_host(x)))

  def fill(self, batch: Batch) -> float:
    _, _, r, width = self.plan.shape
    return self.plan.tokens / max(int(self.plan.micro_batches_M.sum()) * r * width, 1)


Layout = PaddedLayout
