"""The embedded default: DAPO on a verifiable synthetic math task, on a 2-core CPU in minutes.

    python -m dapo_jax.main --workdir=runs/default

A SentencePiece tokenizer is trained on the task's text at first run and cached; the problems are served by
a TFDS builder (array_record). A tiny Qwen2-architecture policy gets a short supervised warm start on
imperfect demonstrations (a weak base model), then DAPO with all four techniques: clip-higher (0.2 / 0.28),
dynamic sampling, token-level loss and overlong reward shaping.

Override any field: `--config.total_steps=100 --config.actor.lr=3e-4`. Real models and data: issue 6's
configs (`configs/dapo_qwen2_5_*.py`).
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 200  # DAPO training steps (one optimizer pass over a filled batch each)
  c.allow_different_config = False  # resume a workdir whose saved config differs
  # A data mesh: every device holds the whole (tiny) policy and its own rows, and the sampler decodes each
  # device's rows in its own loop. On a CPU, `hardware.cpu_devices` splits the host into that many devices.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # rollout_devices: 0 samples on the training devices; n > 0 gives the first n devices (n / processes of each
  # process) to the sampler, on a mesh of `mesh.rollout`'s axes, and trains on the rest (data/fsdp/tensor above).
  c.mesh.rollout_devices = 0
  c.mesh.rollout = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # device_memory_gib: for the start-up memory check. cpu_devices: JAX devices the CPU backend is split into
  # (0: JAX's default of one; -1: one per core). 2 suits the 2-core machines this default is made for (on them
  # it cut a DAPO step by ~19%) and divides every batch size here; an XLA_FLAGS device count takes precedence.
  c.hardware = ml_collections.ConfigDict({"device_memory_gib": 16.0, "cpu_devices": 2})

  c.data = ml_collections.ConfigDict()
  c.data.name = "arithmetic"
  c.data.dir = "~/.cache/dapo_jax"  # TFDS data and the trained tokenizer are cached here
  c.data.max_prompt_length = 64
  # Real math data (data.name = "math"): source data sets in dapo_jax.data.math_datasets.SOURCES.
  c.data.source_dir = "../shared/data"
  c.data.train, c.data.train_split, c.data.eval, c.data.eval_split = "gsm8k", "train", "gsm8k", "test"
  c.data.dedup = True
  c.data.skip_bad_rows = False  # True: rows with an empty problem or answer (and other bad rows) skipped, counted
  c.data.task = ml_collections.ConfigDict(
      {"digits": 2, "num_train": 4000, "num_test": 200, "error_rate": 0.2, "seed": 0})

  c.tokenizer = ml_collections.ConfigDict({"path": "", "vocab_size": 384})

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"
  c.model.hf_path = ""  # a Hugging Face checkpoint directory instead of the preset
  c.model.overrides = ml_collections.ConfigDict({"hidden_size": 128, "intermediate_size": 384, "num_layers": 4,
                                                 "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 512})
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"
  c.model.remat = False  # recompute layers in the backward pass (long sequences)
  c.model.attention_chunk = 0  # attend in query blocks of this many tokens (0: all at once)
  c.model.attention_impl = "auto"  # cuDNN on GPU (16-bit), Pallas flash on TPU, XLA elsewhere

  # cache: reuse the warm start of an earlier run with the same task, model, SFT settings and seed.
  c.sft = ml_collections.ConfigDict({"steps": 400, "batch_size": 64, "lr": 3e-3, "warmup_steps": 30,
                                     "cache": False})

  c.rollout = ml_collections.ConfigDict()
  c.rollout.group_size = 8
  c.rollout.gen_batch_size = 24  # prompts per generation batch
  # streaming: the engine decodes prompt groups as slots free up and hands each finished group to the reward
  # and the dynamic-sampling filter, stopping once the batch is full (False: whole generation batches).
  c.rollout.streaming = True
  # max_staleness: the batch of step t is sampled with the weights of step t - k, on a thread beside the update
  # (dapo_jax/off_policy.py); 0 is the synchronous run.
  c.rollout.max_staleness = 0
  # partial_rollouts: the groups still decoding when a streaming step's batch fills continue in the next step
  # with its weights (each token keeps its log-prob and version) instead of being dropped and sampled again.
  c.rollout.partial_rollouts = False
  # The rollout engine (dapo_jax/engine.py): rows decoding at once (the KV cache's memory budget), tokens per
  # page, decode steps per jitted chunk; see engine.EngineConfig for the rest.
  c.rollout.engine = ml_collections.ConfigDict(
      {"slots": 192, "page_size": 16, "steps_per_chunk": 64, "refill_fraction": 0.125, "prefill_batch": 0,
       "prefill_chunk": 512, "attention_rows": 8})
  c.rollout.train_batch_size = 16  # prompt groups per training step
  c.rollout.max_response_length = 32
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0

  c.dynamic_sampling = ml_collections.ConfigDict(
      {"enable": True, "metric": "acc", "max_num_gen_batches": 10, "on_exhausted": "train_on_kept",
       "carry_over": False})
  c.overlong = ml_collections.ConfigDict({"enable": True, "buffer": 8, "factor": 1.0, "filter": False})
  # The gap between the sampler's log-probs and the trainer's (dapo_jax/rollout_correction.py, the reference's
  # algorithm.rollout_correction): importance weights ("token" / "sequence", truncated at the threshold) and
  # rejection ("token" / "sequence" / "geometric"); "" is off, and 0 thresholds take their defaults.
  c.rollout_correction = ml_collections.ConfigDict({
      "rollout_is": "", "rollout_is_threshold": 2.0, "rollout_rs": "", "rollout_rs_threshold": 0.0,
      "rollout_rs_threshold_lower": 0.0, "rollout_token_veto_threshold": 0.0})
  # timeout_s: each response's scoring limit (timed-out responses score -1 and are counted as
  # reward/timeouts); a worker still busy kill_after_s later is killed and replaced.
  c.reward = ml_collections.ConfigDict({"name": "math_dapo", "workers": 2, "timeout_s": 5.0, "kill_after_s": 5.0})

  c.actor = ml_collections.ConfigDict()
  c.actor.lr = 2e-4
  c.actor.warmup_steps = 3
  c.actor.weight_decay = 0.1
  c.actor.grad_clip = 1.0
  c.actor.clip_low = 0.2
  c.actor.clip_high = 0.28
  c.actor.clip_c = 10.0
  c.actor.loss_agg = "token-mean"
  c.actor.mini_batch_size = 16  # prompt groups per optimizer update
  # The update packs rows into micro-batches of at most this many tokens per device group (the reference's
  # ppo_max_token_len_per_gpu); packed=False pads every row to the prompt and response widths instead, and
  # micro-batches hold micro_batch_size rows.
  c.actor.packed = True
  c.actor.max_tokens_per_micro_batch = 4096
  c.actor.micro_batch_size = 64  # rows per forward/backward when not packed
  c.actor.reuse_sampler_logprobs = False
  c.actor.kl_coef = 0.0
  c.actor.entropy_coef = 0.0

  c.eval = ml_collections.ConfigDict(
      {"every": 20, "num_problems": 100, "k": 4, "temperature": 1.0, "top_p": 1.0, "before_train": True})
  c.checkpoint = ml_collections.ConfigDict({"every": 20, "keep": 3, "asynchronous": True})
  # wandb: also log to Weights & Biases (pip install wandb; wandb_mode "offline" needs no network and no account;
  # "" leaves it to WANDB_MODE / wandb's login), beside metrics.jsonl and TensorBoard.
  c.log = ml_collections.ConfigDict({"progress": True, "samples_per_step": 2, "wandb": False,
                                     "wandb_project": "dapo_jax", "wandb_mode": ""})
  return c
