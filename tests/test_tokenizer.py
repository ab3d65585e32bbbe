"""Both tokenizer backends on tokenizers trained here; chat templates rendered as transformers renders them."""

import json

import pytest

from dapo_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer

QWEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Solve the following math problem step by step.", "What is 12 plus 30? Answer: 42",
          "The last line of your response should be of the form Answer: $Answer", "Remember to put your answer "
          "on its own line after \"Answer:\".", "x^2 + 3x - 4 = 0 so x = 1 or x = -4", "\\frac{1}{2} + \\sqrt{2}"] * 20
MESSAGES = [{"role": "user", "content": "What is 12 plus 30?"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  path = tmp_path_factory.mktemp("hf_tok")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": QWEN_TEMPLATE, "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>", "bos_token": None, "model_max_length": 4096}))
  (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
  return path


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  import sentencepiece
  path = tmp_path_factory.mktemp("sp_tok")
  sentencepiece.SentencePieceTrainer.Train(
      sentence_iterator=iter(CORPUS), model_prefix=str(path / "tokenizer"), vocab_size=400, model_type="bpe",
      user_defined_symbols=SPECIALS[1:], pad_id=0, unk_id=1, bos_id=2, eos_id=3, byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
      minloglevel=2)
  (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}))
  return path


def test_hf_backend_matches_transformers(hf_dir):
  import transformers
  ours = load_tokenizer(hf_dir)
  theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  assert isinstance(ours, HFTokenizer)
  rendered = ours.apply_chat_template(MESSAGES)
  assert rendered == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "What is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n")
  ids = ours.encode(rendered)
  assert ids == theirs(rendered, add_special_tokens=False)["input_ids"]
  assert ids[0] == ours.token_to_id("<|im_start|>") == 1
  assert ours.decode(ids, skip_special_tokens=False) == rendered
  assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
  no_prompt = ours.apply_chat_template(MESSAGES, add_generation_prompt=False)
  assert no_prompt == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
  # Ids and text round trips equal transformers' on text the tokenizer was not trained on too.
  for text in [*CORPUS[:6], "ünïcödé ∑ 🙂", "  two leading spaces", "\n\n\t", "Answer: 42<|im_end|><|endoftext|>", ""]:
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


def test_hf_special_and_stop_ids(hf_dir):
  tok = load_tokenizer(hf_dir, extra_stop_tokens=["<|im_start|>"])
  assert tok.eos_id == 2 and tok.pad_id == 0 and tok.bos_id is None
  assert tok.stop_ids == (2, 0, 1)  # eos, generation_config's extra eos, the extra stop token
  assert tok.vocab_size == 300
  with pytest.raises(TokenizerError, match="stop token '<nope>' is not in the vocabulary"):
    load_tokenizer(hf_dir, extra_stop_tokens=["<nope>"])


def test_sentencepiece_backend(sp_dir):
  tok = load_tokenizer(sp_dir)
  assert isinstance(tok, SentencePieceTokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3) and tok.stop_ids == (3,)
  text = "What is 12 plus 30? Answer: 42"
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode(text, add_bos=True)[0] == 2
  rendered = tok.apply_chat_template(MESSAGES)
  ids = tok.encode(rendered)
  start = tok.token_to_id("<|im_start|>")
  assert ids.count(start) == 3  # user-defined symbols stay single pieces
  assert tok.decode(ids) == rendered  # user-defined symbols are not control tokens: kept in decoded text
  assert tok.decode(ids + [tok.eos_id]) == rendered
  assert tok.token_to_id("<never seen>") is None
  assert tok.vocab_size == 400 and tok.token_to_id("<|im_end|>") == start + 1  # user symbols in order, after 4
  assert start == 4
  unicode = "ünïcödé ∑"
  assert tok.decode(tok.encode(unicode)) == unicode  # byte fallback: nothing is lost


def test_template_errors_and_missing_files(tmp_path, sp_dir, hf_dir):
  with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
    load_tokenizer(tmp_path)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
  (bad / "tokenizer_config.json").write_text('{"chat_template": "{% for m in messages %}"}')
  with pytest.raises(TokenizerError, match="syntax error at line 1"):
    load_tokenizer(bad).apply_chat_template(MESSAGES)
  (bad / "tokenizer_config.json").write_text('{"chat_template": "{{ raise_exception(\'roles must alternate\') }}"}')
  with pytest.raises(TokenizerError, match="roles must alternate"):
    load_tokenizer(bad).apply_chat_template(MESSAGES)
  (bad / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",\n "chat_template": }')
  with pytest.raises(TokenizerError, match=r"tokenizer_config.json: not valid JSON \(line 2"):
    load_tokenizer(bad)
  (bad / "tokenizer_config.json").write_text('{"eos_token": "<missing>"}')
  with pytest.raises(TokenizerError, match="eos_token '<missing>' from tokenizer_config.json is not in the vocab"):
    load_tokenizer(bad)
  (bad / "tokenizer_config.json").unlink()
  with pytest.raises(TokenizerError, match="no chat template"):
    load_tokenizer(bad).apply_chat_template(MESSAGES)
  (bad / "tokenizer.json").write_text("{not json")
  with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
    load_tokenizer(bad)


def test_sandbox_blocks_python_access(hf_dir, tmp_path):
  d = tmp_path / "evil"
  d.mkdir()
  (d / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())

  def render(template):
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return load_tokenizer(d).apply_chat_template(MESSAGES)

  with pytest.raises(TokenizerError, match=r"chat template failed: access to attribute '__class__' of 'list' "
                                           r"object is unsafe"):
    render("{{ messages.__class__.__mro__[1].__subclasses__() }}")
  with pytest.raises(TokenizerError, match=r"access to attribute '__init__' of 'type' object is unsafe"):
    render("{{ cycler.__init__.__globals__ }}")
  # The sandbox is immutable: a template cannot change the messages it is given.
  messages = [dict(m) for m in MESSAGES]
  (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% set x = messages.pop() %}{{ x }}"}))
  with pytest.raises(TokenizerError, match=r"access to attribute 'pop' of 'list' object is unsafe"):
    load_tokenizer(d).apply_chat_template(messages)
  assert messages == MESSAGES
  assert render("{{ ''.__class__ }}") == ""  # an unsafe attribute alone is undefined: nothing leaks


def test_chat_template_file_wins_over_the_config_field(hf_dir, tmp_path):
  """transformers 5 renders chat_template.jinja when both it and tokenizer_config.json's field exist (a
  tokenizer re-saved by newer transformers keeps both): so do we."""
  import shutil
  import transformers
  path = tmp_path / "tok"
  shutil.copytree(hf_dir, path)
  (path / "chat_template.jinja").write_text("FILE {{ messages[0]['content'] }}")
  ours = load_tokenizer(path).apply_chat_template(MESSAGES)
  theirs = transformers.AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
      MESSAGES, tokenize=False, add_generation_prompt=True)
  assert ours == theirs == "FILE What is 12 plus 30?"


def test_the_tasks_tokenizer_cache_is_written_whole_by_one_of_the_runs_building_it(tmp_path, monkeypatch):
  """A copy cut short by a killed run is built again; a run whose copy lands second keeps the first's; no run's
  own folder is left behind."""
  from dapo_jax.data import synthetic
  task = synthetic.ArithmeticTask(digits=2, num_train=40, num_test=4, seed=0)
  directory = tmp_path / "tok"
  directory.mkdir()
  (directory / "tokenizer.model").write_bytes(b"cut short")
  assert synthetic.build_tokenizer(task, directory) == directory
  want = load_tokenizer(directory).encode("12+30=")
  first = (directory / "tokenizer.model").read_bytes()
  (directory / "tokenizer.model").unlink()  # as if another run still builds it; then it lands first:
  import sentencepiece
  train = sentencepiece.SentencePieceTrainer.Train

  def racing(*args, **kwargs):
    train(*args, **kwargs)
    (directory / "tokenizer.model").write_bytes(first)
  monkeypatch.setattr(sentencepiece.SentencePieceTrainer, "Train", racing)
  synthetic.build_tokenizer(task, directory)
  assert (directory / "tokenizer.model").read_bytes() == first and load_tokenizer(directory).encode("12+30=") == want
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
