"""Real math data through TFDS (the files in shared/data), the LaTeX answer checker, and the evaluation
metrics and command."""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dapo_jax.data import math_datasets as md
from dapo_jax.data.prompts import DAPO_TEMPLATE
from dapo_jax.evaluation import majority, pass_at_k, summarize
from dapo_jax.rewards import get

SHARED = Path(os.environ.get("DAPO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data is not beside the checkout")

TEMPLATE_TEXT = ("Solve the following math problem step by step. The last line of your response should be of the "
                 "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
                 "Remember to put your answer on its own line after \"Answer:\".")


def test_template_is_verbatim():
  assert DAPO_TEMPLATE == TEMPLATE_TEXT


@needs_shared
@pytest.mark.parametrize("name,split,count", [("gsm8k", "train", 7473), ("gsm8k", "test", 1319),
                                              ("aime24", "test", 30), ("aime25", "test", 30),
                                              ("amc2023", "test", 40), ("math500", "test", 500),
                                              ("dapo_aime24", "test", 30)])
def test_builders_read_the_real_files(tmp_path_factory, name, split, count):
  data_dir = str(tmp_path_factory.getbasetemp() / "tfds_math")
  rows = md.read_builder_split(md.math_builder(name, str(SHARED), data_dir), split)
  assert len(rows) == count
  first = rows[0]
  assert first["messages"][0]["role"] == "user"
  content = first["messages"][0]["content"]
  assert content.startswith("Solve the following math problem step by step.")
  assert content.endswith("Remember to put your answer on its own line after \"Answer:\".")
  if name != "dapo_aime24":
    assert content == TEMPLATE_TEXT.format(problem=first["problem"])
  if name == "gsm8k" and split == "test":
    assert first["answer"] == "18"  # Janet's ducks
  if name == "dapo_aime24":
    # The same 30 AIME 2024 problems as the aime24 file: the same answers.
    aime = [json.loads(line)["answer"] for line in (SHARED / "aime24" / "test.jsonl").read_text().splitlines()]
    assert sorted(int(r["answer"]) for r in rows) == sorted(int(a) for a in aime)
    assert all(r["data_source"] == "math_dapo" for r in rows)


@needs_shared
def test_dapo_parquet_copies_are_deduplicated_unless_asked(tmp_path):
  rows = md.read_verl_parquet(SHARED / "dapo" / "aime-2024.parquet")
  copies = md.read_verl_parquet(SHARED / "dapo" / "aime-2024.parquet", dedup=False)
  assert len(rows) == 30 and len(copies) == 960
  assert {r["answer"] for r in rows} == {r["answer"] for r in copies}


def test_verl_parquet_written_here(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  msgs = [[{"role": "user", "content": TEMPLATE_TEXT.format(problem=f"What is {i} + 1?")}] for i in range(3)]
  table = pa.table({"data_source": ["math_dapo"] * 6, "prompt": msgs * 2, "ability": ["MATH"] * 6,
                    "reward_model": [{"ground_truth": str(i + 1), "style": "rule-lighteval/MATH_v2"}
                                     for i in range(3)] * 2,
                    "extra_info": [{"index": str(i)} for i in range(6)]})
  pq.write_table(table, tmp_path / "dapo-math-17k.parquet")
  rows = md.read_source("dapo_math17k", "train", tmp_path)
  assert [r["answer"] for r in rows] == ["1", "2", "3"]
  assert len(md.read_source("dapo_math17k", "train", tmp_path, dedup=False)) == 6
  bad = pa.table({"data_source": ["x"], "prompt": [[{"role": "user", "content": "q"}]],
                  "reward_model": [{"style": "s"}]})
  pq.write_table(bad, tmp_path / "bad.parquet")
  with pytest.raises(md.DataError, match=r"bad.parquet: row 0: column 'reward_model' has no 'ground_truth'"):
    md.read_verl_parquet(tmp_path / "bad.parquet")
  pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "cols.parquet")
  with pytest.raises(md.DataError, match=r"missing column\(s\) \['data_source', 'reward_model'\]"):
    md.read_verl_parquet(tmp_path / "cols.parquet")


@needs_shared
def test_edited_source_files_are_prepared_again(tmp_path):
  # Same data_dir, same source path, new content: the prepared copy of the old content must not be served.
  src = tmp_path / "src"
  (src / "aime24").mkdir(parents=True)
  lines = (SHARED / "aime24" / "test.jsonl").read_text().splitlines()
  (src / "aime24" / "test.jsonl").write_text("\n".join(lines[:3]) + "\n")
  data_dir = str(tmp_path / "tfds")
  before = md.read_builder_split(md.math_builder("aime24", str(src), data_dir), "test")
  edited = json.loads(lines[0])
  edited["answer"] = "12345"
  (src / "aime24" / "test.jsonl").write_text("\n".join([json.dumps(edited), *lines[1:2]]) + "\n")
  after = md.read_builder_split(md.math_builder("aime24", str(src), data_dir), "test")
  assert len(before) == 3 and len(after) == 2 and after[0]["answer"] == "12345"
  # The same bytes in another folder share the prepared data.
  other = tmp_path / "other"
  shutil.copytree(src, other)
  reused = md.math_builder("aime24", str(other), data_dir)
  assert reused.data_path == md.math_builder("aime24", str(src), data_dir).data_path
  with pytest.raises(md.DataError, match="missing"):
    md.math_builder("aime24", str(tmp_path / "nowhere"), data_dir)
  # A process without the source files (a multi-host worker sharing only data_dir) reads the copy prepared
  # from the same source_dir.
  shutil.rmtree(src)
  assert md.read_builder_split(md.math_builder("aime24", str(src), data_dir), "test") == after


@needs_shared
def test_dapo_files_side_by_side_as_verl_downloads_them(tmp_path):
  shutil.copy(SHARED / "dapo" / "aime-2024.parquet", tmp_path / "aime-2024.parquet")
  rows = md.read_builder_split(md.math_builder("dapo_aime24", str(tmp_path), str(tmp_path / "tfds")), "test")
  assert len(rows) == 30
  with pytest.raises(md.DataError, match=r"dapo/dapo-math-17k.parquet or .*/dapo-math-17k.parquet: missing .*"
                                         r"or pick a data set found there .*: dapo_aime24$"):
    md.read_source("dapo_math17k", "train", tmp_path)


def test_runs_preparing_one_data_set_at_once_read_the_first_copy(tmp_path, monkeypatch):
  """Two runs sharing a data dir prepare the same data set: the other run's copy lands while this one is still
  writing its own; this one then reads the other's, and no half-written folder is left."""
  from dapo_jax.data import tfds_builders as tb
  from dapo_jax.data.synthetic import ArithmeticTask
  task = ArithmeticTask(digits=2, num_train=8, num_test=4, seed=0)
  split_generators = tb.DapoArithmetic._split_generators
  raced = []

  def racing(self, dl_manager):
    if not raced:
      raced.append(None)
      raced[0] = tb.arithmetic_builder(task, str(tmp_path))  # the other run, start to finish
    return split_generators(self, dl_manager)

  monkeypatch.setattr(tb.DapoArithmetic, "_split_generators", racing)
  builder = tb.arithmetic_builder(task, str(tmp_path))
  assert len(raced) == 1
  got, want = builder.as_data_source()["train"], raced[0].as_data_source()["train"]
  assert [r["id"] for r in got] == [r["id"] for r in want] and len(got) == 8
  version_dir = Path(builder.data_dir).parent
  assert sorted(p.name for p in version_dir.iterdir()) == ["1.0.0"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / "test.jsonl"
  path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answer": "4"}\n{"problem": "3+3"\n')
  with pytest.raises(md.DataError, match=r"test.jsonl:3: not valid JSON"):
    md.read_jsonl(path, "problem", "answer", "x")
  path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
  with pytest.raises(md.DataError, match=r"test.jsonl:2: field 'answer' is missing"):
    md.read_jsonl(path, "problem", "answer", "x")
  path.write_text('{"question": "q", "answer": "no marker"}\n')
  with pytest.raises(md.DataError, match=r"test.jsonl:1: field 'answer': no '####'"):
    md.read_jsonl(path, "question", "answer", "gsm8k")
  with pytest.raises(md.DataError, match="unknown dataset 'nope'"):
    md.read_source("nope", "test", tmp_path)
  with pytest.raises(md.DataError, match="missing \\(dataset 'aime24', split 'test'\\)"):
    md.read_source("aime24", "test", tmp_path)


def test_rows_an_empty_response_would_match_are_refused_with_file_and_line_or_skipped_and_counted(tmp_path,
                                                                                                  caplog):
  path = tmp_path / "test.jsonl"
  good = '{"problem": "1+1", "answer": "2"}\n'
  for body, match in [('{"problem": "2+2", "answer": ""}\n', r"test.jsonl:2: field 'answer' is empty"),
                      ('{"problem": "2+2", "answer": "  "}\n', r"test.jsonl:2: field 'answer' is empty"),
                      ('{"problem": "", "answer": "4"}\n', r"test.jsonl:2: field 'problem' is empty"),
                      ('{"problem": "caf\xe9", "answer": "4"}\n', r"test.jsonl:2: not valid UTF-8 \(byte 16")]:
    path.write_bytes((good + body + good).encode("latin-1"))
    with pytest.raises(md.DataError, match=match + r".*data.skip_bad_rows=True skips"):
      md.read_jsonl(path, "problem", "answer", "x")
    with caplog.at_level("WARNING"):
      rows = md.read_jsonl(path, "problem", "answer", "x", skip_bad_rows=True)
    assert [r["answer"] for r in rows] == ["2", "2"] and [r["index"] for r in rows] == [0, 1]
    assert "skipped 1 bad rows (data.skip_bad_rows), kept 2" in caplog.text
  path.write_text("")
  with pytest.raises(md.DataError, match=r"test.jsonl: no usable rows \(the file is empty\)"):
    md.read_jsonl(path, "problem", "answer", "x")
  path.write_text('{"problem": "", "answer": "4"}\n')
  with pytest.raises(md.DataError, match=r"test.jsonl: no usable rows \(1 bad\)"):
    md.read_jsonl(path, "problem", "answer", "x", skip_bad_rows=True)
  import pyarrow as pa
  import pyarrow.parquet as pq
  msg = [{"role": "user", "content": "q"}]
  pq.write_table(pa.table({"data_source": ["x"] * 3, "prompt": [msg, msg, [{"role": "user", "content": " "}]],
                           "reward_model": [{"ground_truth": "1"}, {"ground_truth": ""}, {"ground_truth": "3"}]}),
                 tmp_path / "empty.parquet")
  with pytest.raises(md.DataError, match=r"empty.parquet: row 1: column 'reward_model': 'ground_truth' is empty"):
    md.read_verl_parquet(tmp_path / "empty.parquet")
  assert [r["answer"] for r in md.read_verl_parquet(tmp_path / "empty.parquet", skip_bad_rows=True)] == ["1"]


def test_an_empty_answer_is_never_right():
  from dapo_jax.rewards.math_dapo import compute_score
  for response in ("Answer: $", "Answer: dollars", "Answer: =", "Answer: \\text{}", "Answer:  "):
    assert compute_score(response, "") == {"score": -1.0, "acc": False, "pred": ""}, response
    assert not compute_score(response, "dollars")["acc"]


def test_gsm8k_answer():
  assert md.gsm8k_answer("so 3 + 4 = <<3+4=7>>7\n#### 1,234") == "1234"


@pytest.mark.parametrize("response,truth,acc", [
    ("Answer: $\\frac{1}{2}$", "\\frac12", True), ("Answer: 0.5", "\\frac{1}{2}", True),
    ("so $\\boxed{(3, \\pi/2)}$", "\\left( 3, \\frac{\\pi}{2} \\right)", True), ("Answer: 7", "8", False),
    ("Answer: 1/2", "\\frac{1}{2}", True), ("Answer: \\sqrt{8}", "2\\sqrt{2}", True), ("no answer", "3", False)])
def test_math_verify_reward(response, truth, acc):
  out = get("math_verify")(response, truth)
  assert out["acc"] is acc and out["score"] == (1.0 if acc else -1.0)


def test_pass_at_k_and_majority():
  assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
  np.testing.assert_allclose(pass_at_k(4, 1, 1), 0.25)
  np.testing.assert_allclose(pass_at_k(4, 1, 2), 0.5)  # 1 - C(3,2)/C(4,2)
  np.testing.assert_allclose(pass_at_k(10, 3, 4), 1 - (7 * 6 * 5 * 4) / (10 * 9 * 8 * 7))
  assert majority(["3", "4", "4", "3"]) == "3"  # tie: the first seen
  res = lambda acc, pred: {"acc": acc, "pred": pred}  # noqa: E731
  s = summarize([{"answer": "4", "results": [res(False, "3"), res(True, "4"), res(True, "4"), res(False, "5")]},
                 {"answer": "9", "results": [res(False, "1")] * 4}], k=4)
  assert s["overall"] == {"avg@4": 0.25, "maj@4": 0.5, "pass@1": 0.25, "pass@2": pytest.approx((5 / 6) / 2),
                          "pass@4": 0.5}
  no_pred = summarize([{"answer": "4", "results": [{"acc": True}, {"acc": False}]}], k=2)["overall"]
  assert np.isnan(no_pred["maj@2"]) and no_pred["pass@2"] == 1.0


def reference_bootstrap(accs, preds, n, seed=42, draws=1000):
  """verl's process_validation_metrics for one prompt and subset size, as its code runs it: np.random.seed, then
  `draws` calls of np.random.choice with replacement; the majority is max(vote counts) over a dict in insertion
  order, scoring the first value of the winning prediction."""
  out = {}
  for name, reduce in (("best", np.max), ("worst", np.min)):
    np.random.seed(seed)
    vals = [reduce([accs[i] for i in np.random.choice(len(accs), size=n, replace=True)]) for _ in range(draws)]
    out[f"{name}@{n}/mean"], out[f"{name}@{n}/std"] = np.mean(vals), np.std(vals)
  np.random.seed(seed)
  vals = []
  for _ in range(draws):
    vote2vals = {}
    for i in np.random.choice(len(accs), size=n, replace=True):
      vote2vals.setdefault(preds[i], []).append(accs[i])
    counts = {k: len(v) for k, v in vote2vals.items()}
    vals.append(vote2vals[max(counts, key=counts.get)][0])
  out[f"maj@{n}/mean"], out[f"maj@{n}/std"] = np.mean(vals), np.std(vals)
  return out


def test_bootstrap_estimates_are_the_references():
  from dapo_jax.evaluation import bootstrap, bootstrap_sizes
  assert bootstrap_sizes(32) == [2, 4, 8, 16, 32] and bootstrap_sizes(6) == [2, 4, 6] and bootstrap_sizes(1) == []
  rng = np.random.default_rng(0)
  for k in (4, 6, 32):
    accs = [float(a) for a in rng.integers(0, 2, k)]
    preds = [str(p) for p in rng.integers(0, 3, k)]  # ties in the vote are common with 3 answers
    for n in bootstrap_sizes(k):
      got, want = bootstrap(accs, preds, n), reference_bootstrap(accs, preds, n)
      assert got.keys() == want.keys()
      np.testing.assert_allclose([got[key] for key in want], [want[key] for key in want], rtol=1e-12)
  assert "maj@2/mean" not in bootstrap([1.0, 0.0], None, 2)  # no predictions: no vote
  res = lambda acc, pred: {"acc": acc, "pred": pred}  # noqa: E731
  s = summarize([{"answer": "4", "results": [res(False, "3"), res(True, "4"), res(True, "4"), res(False, "5")]}], 4)
  want = {**reference_bootstrap([0.0, 1.0, 1.0, 0.0], ["3", "4", "4", "5"], 2),
          **reference_bootstrap([0.0, 1.0, 1.0, 0.0], ["3", "4", "4", "5"], 4), "mean@4": 0.5, "std@4": 0.5}
  assert s["bootstrap"] == pytest.approx(want, rel=1e-12)


@pytest.fixture(scope="module")
def tiny_hf_policy(tmp_path_factory):
  """A random tiny Qwen2 checkpoint with a BPE tokenizer trained here on GSM8K text."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from dapo_jax import model as M
  from dapo_jax import sharding
  path = tmp_path_factory.mktemp("tiny_policy")
  texts = [json.loads(line)["question"] for line in open(SHARED / "gsm8k" / "train.jsonl")][:2000]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tok.train_from_iterator(texts + [TEMPLATE_TEXT] * 50, trainers.BpeTrainer(
      vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path / "tokenizer.json"))
  template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": template, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
  cfg = M.preset("tiny", vocab_size=tok.get_vocab_size(), eos_token_id=2)
  M.save_hf(M.init_sharded(cfg, sharding.make_mesh(), seed=0), path)
  return path


@needs_shared
def test_training_on_the_copies_still_evaluates_each_problem_once(tmp_path, tiny_hf_policy):
  from configs import default as default_config
  from dapo_jax import tasks
  c = default_config.get_config()
  c.data.name, c.data.dir, c.data.source_dir = "math", str(tmp_path / "cache"), str(SHARED)
  c.data.train, c.data.train_split, c.data.eval, c.data.eval_split = "dapo_aime24", "test", "dapo_aime24", "test"
  c.data.dedup = False
  c.tokenizer.path = str(tiny_hf_policy)
  task = tasks.build(c, tmp_path)
  assert len(task.train_rows) == 960  # the copies, as the reference trained
  assert len({r["prompt"] for r in task.eval_rows}) == len(task.eval_rows) == 30


@needs_shared
def test_dapo_steps_on_gsm8k_then_evaluate_the_checkpoint(tmp_path, tiny_hf_policy, caplog):
  import jax
  from configs import default as default_config
  from dapo_jax import config_lib, evaluation, runs, sharding
  from dapo_jax.train import train_and_evaluate
  c = default_config.get_config()
  c.data.name, c.data.dir = "math", str(tmp_path / "cache")
  c.data.source_dir = str(SHARED)
  c.data.train, c.data.train_split, c.data.eval, c.data.eval_split = "gsm8k", "train", "gsm8k", "test"
  c.data.max_prompt_length = 256
  c.model.hf_path = c.tokenizer.path = str(tiny_hf_policy)
  c.sft.steps = 0
  c.total_steps = 2
  c.rollout.group_size, c.rollout.gen_batch_size, c.rollout.train_batch_size = 4, 4, 4
  c.rollout.max_response_length = 16
  c.overlong.buffer = 4
  c.actor.mini_batch_size, c.actor.micro_batch_size = 2, 8
  c.dynamic_sampling.enable = False  # a random policy never solves GSM8K: no group would disagree
  c.eval.every, c.eval.before_train = 0, False
  c.reward.workers = 0
  c.log.progress = False
  workdir = tmp_path / "run"
  train_and_evaluate(c, str(workdir))
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2] and rows[-1]["train/num_gen_batches"] == 1.0
  mesh = sharding.make_mesh(config_lib.mesh_axes(c))
  model, tok = runs.load_policy(str(workdir), c, mesh)
  eval_rows = runs.eval_rows_for("gsm8k", c, tok)[:3]
  with caplog.at_level(logging.WARNING):
    cut = runs.eval_rows_for("gsm8k", c, tok)  # this tokenizer's GSM8K prompts: some over 256 tokens
  n_cut = sum(r["prompt_truncated"] for r in cut)
  assert 0 < n_cut < len(cut) and all(len(r["prompt_ids"]) <= 256 for r in cut)
  assert f"{n_cut} of {len(cut)} gsm8k prompts are longer than data.max_prompt_length=256" in caplog.text
  with pytest.raises(ValueError, match="unknown dataset 'aime2024'; known: 'task', .*'aime24'"):
    runs.eval_rows_for("aime2024", c, tok)
  with jax.set_mesh(mesh):
    summary = evaluation.evaluate_rows(model, tok, eval_rows, k=4, temperature=1.0, top_p=0.7,
                                     max_new_tokens=16, workers=0)
  assert len(summary["problems"]) == 3 and set(summary["overall"]) == {"avg@4", "maj@4", "pass@1", "pass@2",
                                                                       "pass@4"}
  assert summary["problems"][0]["answer"] == "18" and summary["problems"][0]["n"] == 4
  assert summary["truncated_prompts"] == sum(r["prompt_truncated"] for r in eval_rows)
  # Samples do not depend on how many rows decode at once (4 slots: rows wait for one and are admitted later).
  from dapo_jax.engine import EngineConfig
  with jax.set_mesh(mesh):
    greedy = [evaluation.evaluate_rows(model, tok, eval_rows, k=2, temperature=1.0, top_p=1.0, max_new_tokens=16,
                                     workers=0, engine=EngineConfig(slots=s))["problems"] for s in (4, 64)]
  assert [p["sample"] for p in greedy[0]] == [p["sample"] for p in greedy[1]]
  # Exported (what `python -m dapo_jax.export` writes): transformers loads the same policy and tokenizer.
  import jax.numpy as jnp
  import transformers
  from dapo_jax import model as M
  from dapo_jax.testing import hf_logits
  from dapo_jax.tokenizer import write_tokenizer
  M.save_hf(model, tmp_path / "hf")
  write_tokenizer(tok, tmp_path / "hf")
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).float()
  tokens = np.asarray([eval_rows[0]["prompt_ids"]], np.int32)
  with jax.set_mesh(mesh):
    np.testing.assert_allclose(hf_logits(hf, tokens), np.asarray(model(jnp.asarray(tokens))), atol=1e-4)
  # The generic tokenizer.json loader (AutoTokenizer would build Qwen2Tokenizer's own pre-tokenizer for this
  # qwen2 model: right for Qwen's vocabulary, not for this test's).
  hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "hf"))
  text = tok.apply_chat_template(eval_rows[0]["messages"])
  assert hf_tok.apply_chat_template(eval_rows[0]["messages"], tokenize=False, add_generation_prompt=True) == text
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
  gen = transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf"))
  assert list(np.atleast_1d(gen.eos_token_id)) == list(tok.stop_ids)


def test_paper_configs_and_memory_estimate():
  from configs import dapo_qwen2_5_0_5b, dapo_qwen2_5_32b, dapo_qwen2_5_math_7b
  from dapo_jax import config_lib, memory, tasks
  c = dapo_qwen2_5_32b.get_config()
  config_lib.validate(c)
  assert (c.rollout.train_batch_size, c.rollout.group_size, c.rollout.gen_batch_size) == (512, 16, 1536)
  assert c.rollout.train_batch_size // c.actor.mini_batch_size == 16  # 16 updates per step
  assert (c.actor.lr, c.actor.weight_decay, c.actor.clip_low, c.actor.clip_high, c.actor.clip_c) == \
      (1e-6, 0.1, 0.2, 0.28, 10.0)
  assert (c.rollout.max_response_length, c.overlong.buffer, c.data.max_prompt_length) == (20480, 4096, 2048)
  assert c.actor.kl_coef == 0.0 and c.actor.loss_agg == "token-mean" and c.eval.top_p == 0.7
  cfg = tasks.model_config(c)
  assert cfg.num_params() == 32_763_876_352
  est = memory.estimate_for_config(c, cfg, {"fsdp": 8, "tensor": 4})
  np.testing.assert_allclose(est.params, 32_763_876_352 * 4 / 32)
  np.testing.assert_allclose(est.optimizer, 2 * est.params)
  assert est.fits  # with layer remat, 1024-token attention blocks and 256 decode slots
  naive = memory.estimate_for_config(c, cfg.replace(remat=False, attention_chunk=0), {"fsdp": 8, "tensor": 4})
  assert not naive.fits  # materialised 22528^2 attention scores in every layer
  for mod in (dapo_qwen2_5_math_7b, dapo_qwen2_5_0_5b):
    config_lib.validate(mod.get_config())
  c7 = dapo_qwen2_5_math_7b.get_config()
  assert memory.estimate_for_config(c7, tasks.model_config(c7), {"fsdp": 8}).fits
  small = memory.estimate(tasks.model_config(dapo_qwen2_5_0_5b.get_config()), mesh_shape={"fsdp": 8},
                          micro_batch_rows=8, slots=64, prompt_len=256, response_len=512, device_gib=80)
  assert small.fits


def test_off_policy_memory_counts_the_samplers_weights_where_they_live():
  """Off-policy, the sampler holds the weights it samples with and the next version beside the update: on
  shared devices all at once with the update; on devices of its own, with the engine, apart from the update."""
  from configs import dapo_qwen2_5_math_7b
  from dapo_jax import memory, tasks
  c = dapo_qwen2_5_math_7b.get_config()
  cfg = tasks.model_config(c)
  sync = memory.estimate_for_config(c, cfg, {"fsdp": 8})
  assert memory.estimates_for_config(c, cfg, {"fsdp": 8}) == {"all devices": sync}
  c.rollout.max_staleness = 1
  (shared,) = memory.estimates_for_config(c, cfg, {"fsdp": 8}).values()
  state = sync.params + sync.optimizer + sync.gradients
  np.testing.assert_allclose(shared.peak, state + 2 * sync.params + sync.activations + sync.kv_cache)
  half = memory.estimate_for_config(c, cfg, {"fsdp": 4})
  groups = memory.estimates_for_config(c, cfg, {"fsdp": 4}, {"fsdp": 4})
  np.testing.assert_allclose(groups["training devices"].peak,
                             half.params + half.optimizer + half.gradients + half.activations)
  np.testing.assert_allclose(groups["sampling devices"].peak, 2 * half.params + half.kv_cache)
  assert "KV pages" not in groups["training devices"].table()
  assert "sampler's weights (off-policy)" in groups["sampling devices"].table()


def test_a_split_run_is_refused_naming_the_device_group_that_cannot_fit(tmp_path):
  from configs import dapo_qwen2_5_math_7b
  from dapo_jax import config_lib, memory, tasks
  from dapo_jax.train import train_and_evaluate
  c = dapo_qwen2_5_math_7b.get_config()
  c.mesh.update({"data": 1, "fsdp": -1, "tensor": 1, "rollout_devices": 4})
  c.mesh.rollout.update({"data": 1, "fsdp": -1, "tensor": 1})
  c.rollout.max_staleness = 1
  four = {"data": 1, "fsdp": 4, "tensor": 1}
  groups = memory.estimates_for_config(c, tasks.model_config(c), four, four)
  small, big = sorted(groups, key=lambda name: groups[name].peak)
  c.hardware.device_memory_gib = (groups[small].peak + groups[big].peak) / 2 / 0.9 / memory.GIB
  with pytest.raises(config_lib.ConfigValidationError, match=rf"estimated peak of \S+ GiB per device \({big}\)"):
    train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


# verl's recipe/dapo/test_dapo_7b.sh at the DAPO snapshot, field by field: its variable or flag -> our field.
TEST_DAPO_7B = {
    "model.preset": "qwen2.5-math-7b",  # MODEL_PATH=.../Qwen2.5-Math-7B
    "data.train": "dapo_math17k", "data.eval": "dapo_aime24",  # TRAIN_FILE, TEST_FILE
    "data.dedup": False,  # the parquet as published
    "data.max_prompt_length": 2048, "rollout.max_response_length": 2048,  # max_prompt/response_length
    "overlong.enable": True, "overlong.buffer": 512, "overlong.factor": 1.0,
    "dynamic_sampling.enable": True, "dynamic_sampling.metric": "acc", "dynamic_sampling.max_num_gen_batches": 10,
    "dynamic_sampling.on_exhausted": "raise",
    "rollout.train_batch_size": 512, "rollout.gen_batch_size": 1536, "actor.mini_batch_size": 32,
    "rollout.group_size": 16,  # n_resp_per_prompt
    "actor.kl_coef": 0.0, "actor.clip_low": 0.2, "actor.clip_high": 0.28,
    "actor.clip_c": 10.0,  # clip_ratio_c=10.0
    "actor.loss_agg": "token-mean",  # loss_agg_mode="token-mean" (then loss_agg_mode=True: a typo, no mode)
    "actor.lr": 1e-6, "actor.warmup_steps": 10, "actor.weight_decay": 0.1, "actor.grad_clip": 1.0,
    "actor.entropy_coef": 0.0,
    "rollout.temperature": 1.0, "rollout.top_p": 1.0, "rollout.top_k": 0,  # top_k=-1: off
    "eval.temperature": 1.0, "eval.top_p": 1.0,  # val_kwargs
    "eval.k": 32, "eval.num_problems": 30,  # val_kwargs.n=1 over the AIME file's 30 problems x 32 copies
    "eval.before_train": True, "eval.every": 2, "checkpoint.every": 2,  # val_before_train, test_freq, save_freq
    "model.remat": True,  # enable_gradient_checkpointing=True
    "reward.name": "math_dapo",  # reward_manager=dapo
}


def test_the_7b_recipe_is_test_dapo_7b_sh_field_by_field():
  from configs import dapo_qwen2_5_math_7b
  c = dapo_qwen2_5_math_7b.get_config()
  got = {}
  for field in TEST_DAPO_7B:
    node = c
    for part in field.split("."):
      node = node[part]
    got[field] = node
  assert got == TEST_DAPO_7B


def test_a_config_that_cannot_fit_is_refused_before_compiling(tmp_path):
  from configs import dapo_qwen2_5_32b
  from dapo_jax import config_lib
  from dapo_jax.train import train_and_evaluate
  c = dapo_qwen2_5_32b.get_config()
  c.mesh.tensor = 1  # 8 fake devices here
  c.model.remat, c.model.attention_chunk = False, 0
  with pytest.raises(config_lib.ConfigValidationError, match="config does not fit: the estimated peak"):
    train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_the_memory_check_uses_the_chip_the_run_is_on():
  from configs import dapo_qwen2_5_32b
  from dapo_jax import memory

  class Chip:
    def __init__(self, platform, limit):
      self.platform, self.limit = platform, limit

    def memory_stats(self):
      return {"bytes_limit": self.limit}

  c = dapo_qwen2_5_32b.get_config()  # written for 95 GiB v5p chips
  assert memory.device_gib_for(c, Chip("tpu", 32 * memory.GIB)) == 32.0  # a v4 chip
  assert memory.device_gib_for(c, Chip("tpu", 200 * memory.GIB)) == 95.0  # never more than the config says
  assert memory.device_gib_for(c, Chip("cpu", 1)) == 95.0  # host memory is not the budget
  assert memory.device_memory_gib(Chip("gpu", None)) is None
