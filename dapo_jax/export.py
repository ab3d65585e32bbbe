"""Export a trained policy as a Hugging Face checkpoint: `python -m dapo_jax.export --checkpoint=runs/x --out=DIR`.

Writes what `AutoModelForCausalLM.from_pretrained` (and so vLLM or any Hugging Face evaluation harness) reads:
`config.json` and safetensors (`model.save_hf`), the run's tokenizer files (its tokenizer.json or
tokenizer.model, tokenizer_config.json, chat template, ...) and a `generation_config.json` whose
`eos_token_id` lists the run's stop ids (the tokenizer source's own file, with its sampling defaults, when
it has one). `--checkpoint` is a training workdir (its newest checkpoint, or
`--step`), read with its own `run_config.json` unless `--config` is given. Every process of a multi-host run
calls it (the parameters are gathered collectively); process 0 writes.
"""

from __future__ import annotations

from pathlib import Path


def main(argv):
  from absl import flags
  from dapo_jax import cli
  F = flags.FLAGS
  out = Path(F.out).expanduser()
  if out.resolve() == Path(F.checkpoint).expanduser().resolve():
    raise SystemExit(f"export: --out {out} is the checkpoint being read; choose another directory")
  config, mesh, log = cli.start_checkpoint_program()
  from dapo_jax import distributed, runs
  from dapo_jax.model import save_hf
  from dapo_jax.tokenizer import write_tokenizer
  model, tokenizer = runs.load_policy(F.checkpoint, config, mesh, step=F.step)
  save_hf(model, out, dtype=F.dtype or None)
  if distributed.is_main():
    files = write_tokenizer(tokenizer, out)
    log(f"wrote {out}: config.json, weights ({F.dtype or model.cfg.param_dtype}), {', '.join(files)}")


def _define_flags():
  from absl import flags
  from dapo_jax import cli
  cli.define_checkpoint_flags()
  flags.DEFINE_string("out", None, "The directory to write the Hugging Face checkpoint to.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest readable one).")
  flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16", "float16"],
                    "Weights' dtype on disk (default: the run's param_dtype).")
  cli.define_distributed_flags()


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
