"""The embedded default run: `python -m dapo_jax.main --workdir=runs/default`.

Until the DAPO training loop lands (issue 5) this samples grouped rollouts from the tiny policy on the mesh
and writes them to the workdir; it is the same command that will train.

Override any field: `--config.rollout.group_size=4 --config.mesh.tensor=2`.
Use a Hugging Face checkpoint: `--config.model.hf_path=/path/to/Qwen2.5-0.5B --config.tokenizer_path=/same/path`.
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Mesh axes; -1 takes the devices the others leave.
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"  # used when hf_path is empty (random initialisation)
  c.model.hf_path = ""
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"

  c.tokenizer_path = ""  # a checkpoint dir, tokenizer.json or .model; empty: prompts are token ids
  c.prompts = ("What is 12 plus 30?", "Solve 3x = 12.")

  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_prompts = 8
  c.rollout.group_size = 8
  c.rollout.max_new_tokens = 128
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  return c
