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

import json
import shutil
from pathlib import Path

# Besides the tokenizer file itself, the files a Hugging Face tokenizer directory may hold.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                   "merges.txt", "chat_template.jinja")


def write_tokenizer(tokenizer, out: Path) -> list[str]:
  """Copies `tokenizer`'s files into `out` under the names Hugging Face loaders look for, and writes
  `generation_config.json` with its stop ids. Returns the names written."""
  out.mkdir(parents=True, exist_ok=True)
  name = "tokenizer.model" if tokenizer.file.suffix == ".model" else "tokenizer.json"
  if tokenizer.file.resolve() != (out / name).resolve():
    shutil.copyfile(tokenizer.file, out / name)
  written = [name]
  for f in TOKENIZER_FILES:
    if (tokenizer.source / f).is_file() and (tokenizer.source / f).resolve() != (out / f).resolve():
      shutil.copyfile(tokenizer.source / f, out / f)
      written.append(f)
  gen_file = tokenizer.source / "generation_config.json"
  gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
  if tokenizer.stop_ids:  # as transformers writes it: one id, or a list of them
    gen["eos_token_id"] = list(tokenizer.stop_ids) if len(tokenizer.stop_ids) > 1 else tokenizer.stop_ids[0]
  gen.setdefault("pad_token_id", tokenizer.pad_id)
  if tokenizer.bos_id is not None:
    gen.setdefault("bos_token_id", tokenizer.bos_id)
  (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
  return written + ["generation_config.json"]


def main(argv):
  from absl import flags
  from dapo_jax import cli
  F = flags.FLAGS
  out = Path(F.out).expanduser()
  if out.resolve() == Path(F.checkpoint).expanduser().resolve():
    raise SystemExit(f"export: --out {out} is the checkpoint being read; choose another directory")
  config, mesh, log = cli.start_checkpoint_program()
  from dapo_jax import distributed
  from dapo_jax.evaluate import load_policy
  from dapo_jax.model import save_hf
  model, tokenizer = load_policy(F.checkpoint, config, mesh, step=F.step)
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
