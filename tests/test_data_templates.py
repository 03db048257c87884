"""Templates: token ids and answer-only masks, the match with inference-time
``apply_chat_template``, truncation and drop counts.

Mask tests are aligned columns: one row per token, its text and its label
(1 = trained). Tokenizers are built here (no downloads): the shared ChatML one
from hf_builders, and Llama-3-like and Mistral-like (SentencePiece-style
Metaspace) ones carrying their published chat templates.
"""
from __future__ import annotations

import textwrap

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import hf_builders
from jaxsft.data import (Conversation, Counts, Message, RoleTagTemplate, TokenizerTemplate, encode,
                         get_template)

# Published chat templates, verbatim.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}")

# Words of the test conversations, so they are whole tokens and tables short.
CHAT_CORPUS = hf_builders.CORPUS + [
    "system user assistant Be brief. Hi Hello Why? Fine Yes No Tell more. [INST] [/INST]",
    "【USER】： 【BOT】： labels positive negative",
] * 30


def _bpe(specials, pre_tokenizer, decoder, bos):
  tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
  tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
  alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(
      pre_tokenizer, pre_tokenizers.ByteLevel) else []
  tok.train_from_iterator(CHAT_CORPUS, trainers.BpeTrainer(
      vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False))
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials.index(bos))])
  return tok


def llama3_tokenizer():
  """Byte-level BPE with Llama 3's special tokens; eos (<|end_of_text|>) differs
  from the end-of-turn (<|eot_id|>), as in Meta-Llama-3-Instruct."""
  specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
              "<|end_header_id|>", "<|eot_id|>"]
  tok = _bpe(specials, pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
             "<|begin_of_text|>")
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
      additional_special_tokens=specials[2:])
  fast.chat_template = LLAMA3_TEMPLATE
  return fast


def mistral_tokenizer():
  """SentencePiece-style (Metaspace) BPE like Mistral's, [INST] as plain text."""
  specials = ["<unk>", "<s>", "</s>"]
  tok = _bpe(specials, pre_tokenizers.Metaspace(prepend_scheme="first"),
             decoders.Metaspace(prepend_scheme="first"), "<s>")
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  fast.chat_template = MISTRAL_TEMPLATE
  return fast


@pytest.fixture(scope="module")
def chatml():
  return hf_builders.build_tokenizer()


@pytest.fixture(scope="module")
def llama3():
  return llama3_tokenizer()


@pytest.fixture(scope="module")
def mistral():
  return mistral_tokenizer()


def chat(*turns, system=None, source="test.jsonl:1"):
  """A conversation from alternating user/assistant strings."""
  messages = [Message("system", system)] if system else []
  messages += [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
  return Conversation(messages, source=source)


def table(enc, tok) -> str:
  """One row per token: the token (a leading space as ␣, a newline as \\n) and its label."""
  def show(i):
    t = tok.convert_ids_to_tokens(i)
    return t.replace("Ġ", "␣").replace("▁", "␣").replace("Ċ", "\\n").replace("\n", "\\n")
  return "\n".join(f"{show(i):<20}| {m}" for i, m in zip(enc.input_ids, enc.loss_mask))


def expect(text: str) -> str:
  return textwrap.dedent(text).strip("\n")


def apply(tok, template, messages, gen):
  return tok.apply_chat_template([m.as_dict() for m in messages], chat_template=template,
                                 add_generation_prompt=gen)["input_ids"]


MULTI = chat("Hi", "Hello", "Why?", "Fine", system="Be brief.")


CLASSIC = dict(name="classic", user="【USER】：{content}{sep}", assistant="【BOT】：{content}{eos}")


# --- masks, as aligned columns ------------------------------------------------------------------

def test_mask_tokenizer_template_chatml_multiturn(chatml):
  enc = encode(chat("Hi", "Hello", "Why?", "Fine"), get_template("tokenizer", chatml), chatml)
  assert table(enc, chatml) == expect(TABLE_TOKENIZER_CHATML)


def test_mask_builtin_chatml_equals_tokenizer_template(chatml):
  for conv in (MULTI, chat("Hi", "Hello")):
    ours = encode(conv, get_template("chatml"), chatml)
    theirs = encode(conv, get_template("tokenizer", chatml), chatml)
    assert (ours.input_ids, ours.loss_mask) == (theirs.input_ids, theirs.loss_mask)
  # The system prompt sits first, untrained.
  enc = encode(MULTI, get_template("chatml"), chatml)
  assert chatml.decode(enc.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
  n = len(chatml("<|im_start|>system\nBe brief.<|im_end|>\n", add_special_tokens=False).input_ids)
  assert enc.loss_mask[:n] == [0] * n


def test_mask_llama3_multiturn_with_system(llama3):
  enc = encode(MULTI, get_template("llama3"), llama3)
  assert table(enc, llama3) == expect(TABLE_LLAMA3)


def test_mask_mistral_multiturn_system_merged(mistral):
  enc = encode(MULTI, get_template("mistral"), mistral)
  assert table(enc, mistral) == expect(TABLE_MISTRAL)


def test_mask_role_tag_classic(mistral):
  enc = encode(MULTI, get_template(CLASSIC), mistral)
  assert table(enc, mistral) == expect(TABLE_CLASSIC)


def test_train_on_last_assistant_and_everything(llama3):
  full = encode(MULTI, get_template("llama3"), llama3)
  last = encode(MULTI, get_template("llama3", train_on="last_assistant"), llama3)
  every = encode(MULTI, get_template("llama3", train_on="everything"), llama3)
  assert last.input_ids == every.input_ids == full.input_ids
  # last_assistant: the first answer's "Hello<|eot_id|>" is context only.
  assert sum(full.loss_mask) == 6 and sum(last.loss_mask) == 2
  assert last.loss_mask[-2:] == [1, 1] and sum(last.loss_mask[:-2]) == 0
  assert every.loss_mask == [1] * len(every.input_ids)
  with pytest.raises(ValueError, match="train_on 'answers' is not one of"):
    get_template("llama3", train_on="answers")


def test_end_of_turn_trained_and_what_follows_is_not(chatml, llama3, mistral):
  cases = [("chatml", chatml, "<|im_end|>"), ("tokenizer", chatml, "<|im_end|>"),
           ("llama3", llama3, "<|eot_id|>"), ("tokenizer", llama3, "<|eot_id|>"),
           ("mistral", mistral, "</s>"), ("tokenizer", mistral, "</s>")]
  for name, tok, eot in cases:
    enc = encode(chat("Hi", "Hello", "Why?", "Fine"), get_template(name, tok), tok)
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    ends = [i for i, m in enumerate(enc.loss_mask)
            if m and (i + 1 == len(enc.loss_mask) or not enc.loss_mask[i + 1])]
    assert len(ends) == 2, name
    for i in ends:
      assert tokens[i] == eot, (name, tokens[i])


def test_stop_ids(chatml, llama3):
  ids = chatml.convert_tokens_to_ids
  assert get_template("chatml").stop_ids(chatml) == sorted(ids(["<|im_end|>", "</s>"]))
  assert get_template("tokenizer", chatml).stop_ids(chatml) == sorted(ids(["<|im_end|>", "</s>"]))
  ids = llama3.convert_tokens_to_ids
  assert get_template("llama3").stop_ids(llama3) == sorted(ids(["<|eot_id|>", "<|end_of_text|>"]))


# --- training rendering == inference rendering --------------------------------------------------

CONVERSATIONS = [chat("Hi", "Hello"), chat("Hi", "Hello", "Why?", "Fine"), MULTI,
                 chat("  Hi ", " Hello  ", "Why?", "Fine\n", system=" Be brief. ")]
# (template name, tokenizer fixture, published template to compare with, handles a system message)
CASES = [("tokenizer", "chatml", hf_builders.CHATML_TEMPLATE, True),
         ("chatml", "chatml", hf_builders.CHATML_TEMPLATE, True),
         ("qwen2", "chatml", QWEN2_TEMPLATE, True),
         ("tokenizer", "llama3", LLAMA3_TEMPLATE, True),
         ("llama3", "llama3", LLAMA3_TEMPLATE, True),
         ("tokenizer", "mistral", MISTRAL_TEMPLATE, False),
         ("mistral", "mistral", MISTRAL_TEMPLATE, False),
         (CLASSIC, "mistral", None, True)]


@pytest.mark.parametrize("name,tok_name,published,system", CASES,
                         ids=[f"{c[0] if isinstance(c[0], str) else 'classic'}-{c[1]}"
                              for c in CASES])
def test_training_prompt_equals_apply_chat_template(name, tok_name, published, system, request):
  tok = request.getfixturevalue(tok_name)
  template = get_template(name, tok)
  for conv in CONVERSATIONS:
    if conv.messages[0].role == "system" and not system:
      continue
    msgs = conv.messages
    enc = encode(conv, template, tok)
    starts = [i for i, m in enumerate(enc.loss_mask) if m and (i == 0 or not enc.loss_mask[i - 1])]
    turns = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    assert len(starts) == len(turns)
    for start, i in zip(starts, turns):
      # The tokens before each trained answer are exactly the inference prompt:
      # the published template's, and the template's own Jinja (what export writes).
      expected = apply(tok, published or template.jinja(), msgs[:i], gen=True)
      assert enc.input_ids[:start] == expected
      assert template.prompt_ids(msgs[:i], tok) == expected
      assert apply(tok, template.jinja(), msgs[:i], gen=True) == expected
    # The whole example is the published rendering of the conversation.
    assert enc.input_ids == apply(tok, published or template.jinja(), msgs, gen=False)
    for gen in (False, True):
      text = tok.apply_chat_template([m.as_dict() for m in msgs], chat_template=template.jinja(),
                                     tokenize=False, add_generation_prompt=gen)
      assert text == template.render_text(msgs, tok, add_generation_prompt=gen)


def test_jinja_survives_save_and_load(tmp_path, llama3):
  """Export writes jinja() into the tokenizer files; reloaded, it renders the same prompt."""
  template = get_template(CLASSIC)
  llama3 = llama3_tokenizer()
  llama3.chat_template = template.jinja()
  llama3.save_pretrained(tmp_path)
  loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
  msgs = MULTI.messages[:-1]
  assert loaded.apply_chat_template([m.as_dict() for m in msgs], add_generation_prompt=True)[
      "input_ids"] == template.prompt_ids(msgs, loaded)
  assert "【USER】：" in loaded.chat_template


def test_prompt_ids_accepts_dicts(chatml):
  t = get_template("chatml")
  assert t.prompt_ids([{"role": "user", "content": "Hi"}], chatml) == t.prompt_ids(
      [Message("user", "Hi")], chatml)


# --- system prompts -----------------------------------------------------------------------------

def test_default_system_and_own_system(chatml):
  qwen = get_template("qwen2")
  text = chatml.decode(encode(chat("Hi", "Hello"), qwen, chatml).input_ids)
  assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                         "<|im_start|>user\nHi<|im_end|>\n")
  text = chatml.decode(encode(chat("Hi", "Hello", system="Be brief."), qwen, chatml).input_ids)
  assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
  assert "helpful" not in text


def test_role_tag_system_slot_and_default(mistral):
  t = get_template({**CLASSIC, "system": "【SYS】：{content}{sep}", "default_system": "Be kind."})
  text = t.render_text(chat("Hi", "Hello").messages, mistral)
  assert text.startswith("<s>【SYS】：Be kind.\n【USER】：Hi\n")
  text = t.render_text(MULTI.messages, mistral)
  assert text.startswith("<s>【SYS】：Be brief.\n【USER】：Hi\n")
  for conv in (chat("Hi", "Hello"), MULTI):
    msgs = conv.messages[:-1]
    assert apply(mistral, t.jinja(), msgs, gen=True) == t.prompt_ids(msgs, mistral)


# --- bad templates ------------------------------------------------------------------------------

def test_role_tag_without_eos_fails_at_construction():
  with pytest.raises(ValueError, match="no end-of-turn after {content}.*never learn to stop"):
    get_template(dict(name="noeos", user="【USER】：{content}\n", assistant="【BOT】：{content}\n"))
  with pytest.raises(ValueError, match=r"must contain \{content\} exactly once"):
    RoleTagTemplate(user="USER:")
  with pytest.raises(ValueError, match=r"uses \{answer\}"):
    RoleTagTemplate(assistant="BOT: {answer}{eos}")
  with pytest.raises(ValueError, match="unknown keys \\['eos_token'\\]"):
    get_template({"eos_token": "</s>"})
  with pytest.raises(ValueError, match="template 'vicuna' is not one of"):
    get_template("vicuna")


def test_tokenizer_template_without_eos_fails_at_construction(chatml):
  plain = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
           "{% if add_generation_prompt %}assistant: {% endif %}")
  with pytest.raises(ValueError, match="emits no end-of-turn token.*never learn to stop"):
    TokenizerTemplate(chatml, chat_template=plain)
  tok = hf_builders.build_tokenizer()
  tok.chat_template = None
  with pytest.raises(ValueError, match="the tokenizer has no chat_template"):
    get_template("tokenizer", tok)


def test_end_of_turn_must_be_one_token(mistral):
  with pytest.raises(ValueError, match="end-of-turn '<\\|im_end\\|>' is not one token"):
    encode(chat("Hi", "Hello"), get_template("chatml"), mistral)


def test_not_prefix_stable_template_is_an_error_naming_the_row(chatml):
  # Rewrites earlier answers once later turns follow (as reasoning templates do).
  rewriting = (
      "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
      "<|im_start|>assistant\n(earlier)<|im_end|>\n{% else %}"
      "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  template = TokenizerTemplate(chatml, chat_template=rewriting)  # one turn is fine
  with pytest.raises(ValueError, match="rows.jsonl:7: template 'tokenizer' is not prefix-stable"):
    encode(chat("Hi", "Hello", "Why?", "Fine", source="rows.jsonl:7"), template, chatml)


# --- dropping, truncation, counts ---------------------------------------------------------------

def test_no_assistant_turn_is_dropped_and_counted(chatml):
  counts = Counts()
  t = get_template("chatml")
  assert encode(chat("Hi"), t, chatml, counts=counts) is None
  assert encode(Conversation([Message("system", "x")]), t, chatml, counts=counts) is None
  assert encode(chat("Hi", "Hello"), t, chatml, counts=counts) is not None
  assert counts == Counts(examples=3, dropped_no_assistant=2)
  assert counts.kept == 1


def test_trailing_user_turn_is_left_out(chatml):
  t = get_template("chatml")
  assert encode(chat("Hi", "Hello", "Why?"), t, chatml) == encode(chat("Hi", "Hello"), t, chatml)


def test_truncation_drop(llama3):
  t = get_template("llama3")
  n = len(encode(MULTI, t, llama3))
  counts = Counts()
  assert encode(MULTI, t, llama3, max_length=n, counts=counts) is not None
  assert encode(MULTI, t, llama3, max_length=n - 1, counts=counts) is None
  assert counts == Counts(examples=2, dropped_too_long=1)


def test_truncation_keep_answer_drops_oldest_exchange_keeps_system(llama3):
  t = get_template("llama3")
  counts = Counts()
  short = encode(chat("Why?", "Fine", system="Be brief."), t, llama3)
  enc = encode(MULTI, t, llama3, max_length=len(short), truncation="keep_answer", counts=counts)
  assert (enc.input_ids, enc.loss_mask) == (short.input_ids, short.loss_mask)
  assert counts == Counts(examples=1, truncated=1)


def test_truncation_keep_answer_cuts_the_user_message_from_its_start(chatml, llama3):
  t = get_template("llama3")
  question = "Be brief. Hi Hi Why?"
  full = encode(chat(question, "Hello", system="Be brief."), t, llama3)
  enc = encode(chat(question, "Hello", system="Be brief."), t, llama3, max_length=len(full) - 3,
               truncation="keep_answer")
  assert len(enc) <= len(full) - 3
  # The same as the example whose question had lost its first words: the
  # system message, role headers and the whole answer are still there.
  tails = [question[i:] for i in range(len(question))]
  shorter = [encode(chat(q, "Hello", system="Be brief."), t, llama3) for q in tails]
  assert any((e.input_ids, e.loss_mask) == (enc.input_ids, enc.loss_mask) for e in shorter)
  assert llama3.decode(enc.input_ids).endswith("Why?<|eot_id|><|start_header_id|>assistant"
                                               "<|end_header_id|>\n\nHello<|eot_id|>")
  assert sum(enc.loss_mask) == sum(full.loss_mask)
  # Not even an empty question leaves room for the answer: dropped, never cut.
  counts = Counts()
  empty = len(encode(chat("", "Hello"), t, llama3))
  assert encode(chat("Hi", "Hello"), t, llama3, max_length=empty - 1,
                truncation="keep_answer", counts=counts) is None
  assert counts.dropped_too_long == 1
  # ChatML's untrained "\n" after the last <|im_end|> goes first.
  c = get_template("chatml")
  full = encode(chat("Hi", "Hello"), c, chatml)
  enc = encode(chat("Hi", "Hello"), c, chatml, max_length=len(full) - 1, truncation="keep_answer")
  assert enc.input_ids == full.input_ids[:-1] and enc.loss_mask[-1] == 1


def test_truncation_rejects_unknown_mode(chatml):
  with pytest.raises(ValueError, match="truncation 'left' is not one of"):
    encode(chat("Hi", "Hello"), get_template("chatml"), chatml, max_length=4, truncation="left")


# --- other kinds --------------------------------------------------------------------------------

def test_text_is_fully_trained_and_ends_with_eos(llama3, chatml):
  doc = Conversation(kind="text", text="Hello", source="t:1")
  enc = encode(doc, get_template("llama3"), llama3)
  assert llama3.decode(enc.input_ids) == "<|begin_of_text|>Hello<|end_of_text|>"
  assert enc.input_ids[0] == llama3.bos_token_id and enc.input_ids[-1] == llama3.eos_token_id
  assert enc.loss_mask == [1] * len(enc.input_ids)
  # A text the tokenizer already ends with eos gets no second one.
  again = encode(Conversation(kind="text", text="Hello<|end_of_text|>"), get_template("llama3"),
                 llama3)
  assert again.input_ids == enc.input_ids
  counts = Counts()
  long = Conversation(kind="text", text="Hi Hello Why? Fine", source="t:2")
  enc = encode(long, get_template("chatml"), chatml, max_length=3, truncation="keep_answer",
               counts=counts)
  assert len(enc.input_ids) == 3 and enc.input_ids[-1] != chatml.eos_token_id
  assert encode(long, get_template("chatml"), chatml, max_length=3, counts=counts) is None
  assert counts == Counts(examples=2, dropped_too_long=1, truncated=1)


def test_label_is_trained_as_a_json_answer(llama3):
  conv = Conversation([Message("user", "Fine")], kind="label", text="Fine",
                      labels=["positive"], source="l:1")
  enc = encode(conv, get_template("llama3"), llama3)
  trained = [i for i, m in zip(enc.input_ids, enc.loss_mask) if m]
  assert llama3.decode(trained) == '{"labels": ["positive"]}<|eot_id|>'


def test_pairwise_gives_two_encodings_with_one_prompt(mistral):
  conv = Conversation([Message("system", "Be brief."), Message("user", "Why?")], kind="pairwise",
                      chosen="Fine", rejected="No", source="p:1")
  chosen, rejected = encode(conv, get_template("mistral"), mistral)
  start = chosen.loss_mask.index(1)
  assert chosen.input_ids[:start] == rejected.input_ids[:start] == get_template(
      "mistral").prompt_ids(conv.messages, mistral)
  trained = [i for i, m in zip(rejected.input_ids, rejected.loss_mask) if m]
  assert mistral.decode(trained) == "No</s>"
  # Truncation cuts both prompts by the same amount, so the pair stays comparable.
  n = max(len(chosen), len(rejected))
  chosen2, rejected2 = encode(conv, get_template("mistral"), mistral, max_length=n - 2,
                              truncation="keep_answer")
  assert chosen2.input_ids[:-sum(chosen2.loss_mask)] == rejected2.input_ids[
      :-sum(rejected2.loss_mask)]


def test_counts_add_up():
  total = Counts(1, 2, 3, 4) + Counts(10, 0, 1, 0)
  assert total == Counts(11, 2, 4, 4)
  assert total.as_dict() == dict(examples=11, dropped_no_assistant=2, dropped_too_long=4,
                                 truncated=4, kept=5)


# Expected tables: token | label (1 = trained).

TABLE_TOKENIZER_CHATML = r"""
<|im_start|>        | 0
u                   | 0
s                   | 0
er                  | 0
\n                  | 0
H                   | 0
i                   | 0
<|im_end|>          | 0
\n                  | 0
<|im_start|>        | 0
as                  | 0
s                   | 0
is                  | 0
t                   | 0
a                   | 0
nt                  | 0
\n                  | 0
H                   | 1
e                   | 1
ll                  | 1
o                   | 1
<|im_end|>          | 1
\n                  | 0
<|im_start|>        | 0
u                   | 0
s                   | 0
er                  | 0
\n                  | 0
W                   | 0
h                   | 0
y                   | 0
?                   | 0
<|im_end|>          | 0
\n                  | 0
<|im_start|>        | 0
as                  | 0
s                   | 0
is                  | 0
t                   | 0
a                   | 0
nt                  | 0
\n                  | 0
Fin                 | 1
e                   | 1
<|im_end|>          | 1
\n                  | 0
"""

TABLE_LLAMA3 = r"""
<|begin_of_text|>   | 0
<|start_header_id|> | 0
system              | 0
<|end_header_id|>   | 0
\n                  | 0
\n                  | 0
Be                  | 0
␣brief              | 0
.                   | 0
<|eot_id|>          | 0
<|start_header_id|> | 0
user                | 0
<|end_header_id|>   | 0
\n                  | 0
\n                  | 0
H                   | 0
i                   | 0
<|eot_id|>          | 0
<|start_header_id|> | 0
a                   | 0
ssi                 | 0
stant               | 0
<|end_header_id|>   | 0
\n                  | 0
\n                  | 0
H                   | 1
ell                 | 1
o                   | 1
<|eot_id|>          | 1
<|start_header_id|> | 0
user                | 0
<|end_header_id|>   | 0
\n                  | 0
\n                  | 0
Wh                  | 0
y                   | 0
?                   | 0
<|eot_id|>          | 0
<|start_header_id|> | 0
a                   | 0
ssi                 | 0
stant               | 0
<|end_header_id|>   | 0
\n                  | 0
\n                  | 0
Fine                | 1
<|eot_id|>          | 1
"""

TABLE_MISTRAL = r"""
<s>                 | 0
[                   | 0
INST]               | 0
␣Be                 | 0
␣brief.             | 0
\n                  | 0
\n                  | 0
H                   | 0
i                   | 0
␣[/INST]            | 0
H                   | 1
ell                 | 1
o                   | 1
</s>                | 1
[                   | 0
INST]               | 0
␣Why?               | 0
␣[/INST]            | 0
Fin                 | 1
e                   | 1
</s>                | 1
"""

TABLE_CLASSIC = r"""
<s>                 | 0
【                   | 0
USER                | 0
】：                  | 0
Be                  | 0
␣brief.             | 0
\n                  | 0
\n                  | 0
H                   | 0
i                   | 0
\n                  | 0
【                   | 0
BO                  | 0
T】：                 | 0
H                   | 1
ell                 | 1
o                   | 1
</s>                | 1
【                   | 0
USER                | 0
】：                  | 0
Wh                  | 0
y?                  | 0
\n                  | 0
【                   | 0
BO                  | 0
T】：                 | 0
Fin                 | 1
e                   | 1
</s>                | 1
"""
