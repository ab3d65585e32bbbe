"""Tokenizers: one small interface over a SentencePiece `.model` or a Hugging Face `tokenizer.json`, with the
chat template (`chat_template.jinja`, else `tokenizer_config.json`'s) rendered as transformers renders it, and
the stop tokens generation should end on.

    tok = load_tokenizer("path/to/checkpoint")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "1+1?"}]))
"""

from __future__ import annotations

import abc
import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TokenizerError(ValueError):
  """A tokenizer file is missing or malformed, or a special token is unknown."""


def _token_content(value) -> str | None:
  # tokenizer_config.json writes special tokens as a string or as an AddedToken dict.
  if isinstance(value, dict):
    return value.get("content")
  return value


def _read_json(file: Path) -> dict:
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise TokenizerError(f"{file}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None


class Tokenizer(abc.ABC):
  """Text <-> ids, the chat template, and the special ids generation needs.

  `stop_ids` holds every id that ends a response: the EOS token, the ids of `generation_config.json`'s
  `eos_token_id`, and any `extra_stop_tokens` given when loading.
  """

  def __init__(self, *, config: dict, source: Path, chat_template: str | None,
               extra_stop_tokens: Sequence[str] = ()):
    self.source = source
    self.config = config
    self.chat_template = chat_template
    self.special_tokens = {k: _token_content(config.get(k)) for k in
                           ("bos_token", "eos_token", "pad_token", "unk_token")}
    self.special_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
    self.eos_id = self._special_id("eos_token", self._default_eos_id())
    self.bos_id = self._special_id("bos_token", self._default_bos_id())
    self.pad_id = self._special_id("pad_token", self._default_pad_id())
    self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id is not None
    stops = [self.eos_id]
    gen = source / "generation_config.json"
    if gen.is_file():
      eos = _read_json(gen).get("eos_token_id")
      stops += eos if isinstance(eos, list) else [] if eos is None else [eos]
    for token in extra_stop_tokens:
      tid = self.token_to_id(token)
      if tid is None:
        raise TokenizerError(f"{source}: stop token {token!r} is not in the vocabulary")
      stops.append(tid)
    self.stop_ids = tuple(dict.fromkeys(s for s in stops if s is not None))
    self._template = None

  def _special_id(self, key: str, default: int | None) -> int | None:
    token = self.special_tokens.get(key)
    if token is None:
      return default
    tid = self.token_to_id(token)
    if tid is None:
      raise TokenizerError(f"{self.source}: {key} {token!r} from tokenizer_config.json is not in the vocabulary")
    return tid

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    ...

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    ...

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    ...

  @abc.abstractmethod
  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    ...

  def _default_eos_id(self) -> int | None:
    return None

  def _default_bos_id(self) -> int | None:
    return None

  def _default_pad_id(self) -> int | None:
    return self.eos_id

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    """Ids of `text`. Special tokens written in the text (e.g. from a chat template) become their ids.
    A BOS id is prepended only if asked, or by default when the tokenizer config says `add_bos_token`."""
    ids = self._encode(text)
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      if not ids or ids[0] != self.bos_id:
        ids = [self.bos_id] + ids
    return ids

  def apply_chat_template(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                          **kwargs) -> str:
    """Renders messages with the checkpoint's Jinja chat template, as transformers does."""
    if self.chat_template is None:
      raise TokenizerError(f"{self.source}: no chat template (tokenizer_config.json 'chat_template' or "
                           f"chat_template.jinja)")
    if self._template is None:
      self._template = _compile(self.chat_template, self.source)
    try:
      return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens, **kwargs)
    except jinja2.TemplateError as e:
      raise TokenizerError(f"{self.source}: chat template failed: {e}") from None


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile(template: str, source: Path) -> jinja2.Template:
  # A sandbox: templates come with downloaded checkpoints and must not reach Python objects.
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                     extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise TokenizerError(f"{source}: chat template has a syntax error at line {e.lineno}: {e.message}") from None


class HFTokenizer(Tokenizer):
  """A Hugging Face fast tokenizer (`tokenizer.json`, the `tokenizers` library)."""

  def __init__(self, file: Path, **kwargs):
    import tokenizers
    self.file = Path(file)
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises a bare Exception
      raise TokenizerError(f"{file}: not a readable tokenizer.json: {e}") from None
    self._special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
    super().__init__(**kwargs)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def _encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model (`tokenizer.model` or any `.model` file)."""

  def __init__(self, file: Path, **kwargs):
    import sentencepiece
    self.file = Path(file)
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.Load(str(file))
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"{file}: not a readable SentencePiece model: {e}") from None
    super().__init__(**kwargs)

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  def token_to_id(self, token: str) -> int | None:
    tid = self._sp.PieceToId(token)
    return None if tid == self._sp.unk_id() and token != self._sp.IdToPiece(tid) else tid

  def _default_eos_id(self):
    return None if self._sp.eos_id() < 0 else self._sp.eos_id()

  def _default_bos_id(self):
    return None if self._sp.bos_id() < 0 else self._sp.bos_id()

  def _default_pad_id(self):
    return self.eos_id if self._sp.pad_id() < 0 else self._sp.pad_id()

  def _encode(self, text: str) -> list[int]:
    return list(self._sp.EncodeAsIds(text))

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    if skip_special_tokens:
      special = {i for i in (self.eos_id, self.bos_id, self.pad_id) if i is not None}
      ids = [i for i in ids if i not in special and not self._sp.IsControl(i)]
    return self._sp.DecodeIds(ids)


def load_tokenizer(path: str | os.PathLike, *, extra_stop_tokens: Sequence[str] = (),
                   chat_template: str | None = None) -> Tokenizer:
  """A tokenizer from a checkpoint directory (tokenizer.json or tokenizer.model, with tokenizer_config.json)
  or from a `.model` / `tokenizer.json` file directly."""
  path = Path(path).expanduser()
  if path.is_file():
    directory, file = path.parent, path
  elif path.is_dir():
    directory = path
    candidates = [path / "tokenizer.json", path / "tokenizer.model"]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
      raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model")
  else:
    raise TokenizerError(f"{path}: no such tokenizer file or directory")
  config_file = directory / "tokenizer_config.json"
  config = _read_json(config_file) if config_file.is_file() else {}
  # chat_template.jinja before tokenizer_config.json's field, as transformers 5 takes them: a tokenizer
  # re-saved by newer transformers keeps the old field beside the file, and the file is the one in use.
  jinja_file = directory / "chat_template.jinja"
  template = chat_template or (jinja_file.read_text() if jinja_file.is_file() else config.get("chat_template"))
  if isinstance(template, list):  # named templates: use "default"
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default")
  cls = SentencePieceTokenizer if file.suffix == ".model" else HFTokenizer
  return cls(file, config=config, source=directory, chat_template=template, extra_stop_tokens=extra_stop_tokens)


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
