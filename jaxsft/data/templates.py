"""Chat templates: conversations → token ids and answer-only loss masks.

Two kinds of template, one way of tokenizing them:

- ``TokenizerTemplate``: the tokenizer's own Jinja ``chat_template``.
- ``RoleTagTemplate``: defined by a few format strings, e.g. the classic
  ``<bos>【USER】：{instruction}<sep>【BOT】：{answer}<eos>`` is
  ``RoleTagTemplate(user="【USER】：{content}{sep}", assistant="【BOT】：{content}{eos}",
  sep="<sep>")``. The built-ins ``chatml``, ``qwen2``, ``llama3`` and
  ``mistral`` are role-tag templates with the published formats.

How a conversation is tokenized (``Template.layout``). For each assistant turn
i, the text of the conversation up to it is rendered twice — ending with the
generation prompt (exactly what inference renders to ask for turn i), and
ending after turn i — and each text is tokenized whole, as
``tokenizer.apply_chat_template`` does. Each rendering must be a token-prefix of
the next; the tokens of turn i are then the difference, and the example's ids
are the last rendering. So the prompt of every turn is, by construction, the
token sequence inference will see, for any tokenizer, and a template that
rewrites earlier turns, or text that merges into one token across a turn
boundary, is an error naming the row — never a silently shifted mask.
Role-tag templates are tokenized the same way rather than piece by piece:
SentencePiece-style tokenizers (Llama 2, Mistral) tokenize a piece differently
at the start of a string than inside one, so separately tokenized pieces would
not be the ids inference produces from the rendered prompt.

Which tokens are trained (``loss_mask`` 1; HF ``labels != -100``): each
assistant turn's tokens after its generation prompt, up to and including its
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>`` …), so the model
learns to stop. Tokens the template emits after that (ChatML's ``"\\n"``) are
not trained: they are formatting between turns, and inference stops before
them. The end-of-turn is a role-tag template's ``stop`` string, which must be a
single token; for a tokenizer template it is the last special token the
template emits after the answer. A template that emits none is rejected when
constructed. ``train_on``: ``all_assistant`` (default) trains every assistant
turn, ``last_assistant`` the last one only, ``everything`` every token.

Other kinds: raw ``text`` is ``tokenizer(text)`` (with the tokenizer's own bos,
if it adds one) plus eos, so a document's end is learnt, all of it trained;
``label`` examples are trained to generate ``{"labels": [...]}`` as the
answer; ``pairwise`` examples give two encodings, prompt + chosen and
prompt + rejected.

Task heads (``encode_head``) read sequences, not answers: a ``label`` example
for a classification head is ``tokenizer(text)`` (what transformers'
*ForSequenceClassification is given; no template, no system prompt), and a
``pairwise`` example for a reward model is its two full renderings, prompt +
chosen then prompt + rejected, as ``apply_chat_template`` writes them. The
mask marks the token each sequence is scored at: its last.
"""
from __future__ import annotations

import dataclasses
import json
import string
from typing import Any, Iterable, Mapping, Sequence

from jaxsft.data.formats import Conversation, Message, label_answer, uses_tools

TRAIN_ON = ("all_assistant", "last_assistant", "everything")
TRUNCATION = ("drop", "keep_answer")


@dataclasses.dataclass
class Encoded:
  """Token ids of one example and the mask of the tokens it is trained on
  (1 = a trained label, aligned with ``input_ids``)."""
  input_ids: list[int]
  loss_mask: list[int]
  source: str = ""

  def __len__(self) -> int:
    return len(self.input_ids)


@dataclasses.dataclass
class Counts:
  """What ``encode`` kept and why it dropped or cut examples; add them up
  across shards with ``+``."""
  examples: int = 0
  dropped_no_assistant: int = 0
  dropped_too_long: int = 0
  truncated: int = 0

  @property
  def kept(self) -> int:
    return self.examples - self.dropped_no_assistant - self.dropped_too_long

  def __add__(self, other: "Counts") -> "Counts":
    return Counts(*(getattr(self, f.name) + getattr(other, f.name)
                    for f in dataclasses.fields(self)))

  def as_dict(self) -> dict[str, int]:
    return {**dataclasses.asdict(self), "kept": self.kept}


@dataclasses.dataclass
class Layout:
  """A tokenized conversation: its ids and, per assistant turn, the span
  ``[start, end)`` of its trained tokens (answer + end-of-turn)."""
  input_ids: list[int]
  spans: list[tuple[int, int]]


class Template:
  """A chat template (see the module doc). Subclasses define ``render_text``,
  ``end_of_turn_ids`` and ``jinja``."""
  name: str = "template"
  train_on: str = "all_assistant"
  # Whether it can render tool calls, tool results and tool schemas.
  supports_tools: bool = False

  def render_text(self, messages: Sequence[Message], tokenizer,
                  add_generation_prompt: bool = False, tools: list | None = None) -> str:
    """The text of ``messages`` (with the function schemas ``tools``), ending
    with the generation prompt if asked."""
    raise NotImplementedError

  def end_of_turn_ids(self, tokenizer) -> set[int]:
    """Token ids that may close an assistant turn."""
    raise NotImplementedError

  def jinja(self) -> str:
    """A Jinja chat template rendering exactly ``render_text``: export writes
    it into the tokenizer files so ``apply_chat_template`` after export
    reproduces the training prompts."""
    raise NotImplementedError

  def stop_ids(self, tokenizer) -> list[int]:
    """The ids generation should stop at: the end-of-turn and the eos."""
    ids = self._probe_eot(tokenizer)
    if tokenizer.eos_token_id is not None:
      ids.add(tokenizer.eos_token_id)
    return sorted(ids)

  def prompt_ids(self, messages: Sequence[Message | Mapping[str, str]], tokenizer) -> list[int]:
    """The ids inference feeds the model to answer ``messages``: the rendering
    with the generation prompt, tokenized whole."""
    text = self.render_text(_messages(messages), tokenizer, add_generation_prompt=True)
    return _tokenize(tokenizer, [text])[0]

  def render(self, conversation: Conversation, tokenizer):
    """``encode`` without a length limit: an ``Encoded`` (a pair for pairwise
    examples), or None for a chat without an assistant turn."""
    return encode(conversation, self, tokenizer)

  def layout(self, messages: Sequence[Message], tokenizer, source: str = "",
             tools: list | None = None) -> Layout:
    """Tokenize ``messages`` prefix by prefix (see the module doc), the
    function schemas ``tools`` rendered with each prefix. Messages after the
    last assistant turn are left out: nothing would be trained on them. Tool
    results are part of the next turn's prompt, never trained."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    assert last is not None, "layout needs an assistant turn"
    messages = list(messages[:last + 1])
    source = source or "conversation"
    if not self.supports_tools and uses_tools(messages, tools):
      raise ValueError(
          f"{source}: tool calls, tool results and tool schemas are written differently by "
          f"every model family, and template {self.name!r} does not know this model's way; use "
          "the tokenizer's own chat template (data.template='tokenizer') of a model trained "
          "for tool use (e.g. Qwen2.5, Llama 3.1)")
    texts = []
    for i, m in enumerate(messages):
      if m.role == "assistant":
        texts.append(self.render_text(messages[:i], tokenizer, add_generation_prompt=True,
                                      tools=tools))
        texts.append(self.render_text(messages[:i + 1], tokenizer, tools=tools))
    missing = [n for n in tool_names(messages, tools) if n not in texts[-1]]
    if missing:
      raise ValueError(
          f"{source}: template {self.name!r} does not write the tools or tool calls of this "
          f"conversation (its rendering never names {missing[:3]}), so they would be dropped "
          "from the training text; use the chat template of a model trained for tool use "
          "(e.g. Qwen2.5, Llama 3.1)")
    seqs = _tokenize(tokenizer, texts)
    eot = self.end_of_turn_ids(tokenizer)
    spans, previous, turn = [], [], 0
    for k in range(0, len(seqs), 2):
      prompt, full = seqs[k], seqs[k + 1]
      turn += 1
      self._require_prefix(previous, prompt, tokenizer, source,
                           f"the rendering through assistant turn {turn - 1}",
                           f"the prompt of assistant turn {turn}")
      self._require_prefix(prompt, full, tokenizer, source, f"the prompt of assistant turn {turn}",
                           f"the rendering through assistant turn {turn}")
      closers = [j for j in range(len(prompt), len(full)) if full[j] in eot]
      if not closers:
        raise ValueError(
            f"{source}: template {self.name!r} emits no end-of-turn token after assistant turn "
            f"{turn} (looked for {_show(tokenizer, sorted(eot))[:120]}), so the model would never "
            "learn to stop; use a template that ends answers with eos or an end-of-turn token")
      spans.append((len(prompt), closers[-1] + 1))
      previous = full
    return Layout(previous, spans)

  def loss_mask(self, length: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """The mask of ``train_on`` for a sequence of ``length`` with these spans."""
    if self.train_on == "everything":
      return [1] * length
    mask = [0] * length
    for start, end in spans if self.train_on == "all_assistant" else spans[-1:]:
      mask[start:end] = [1] * (end - start)
    return mask

  def _require_prefix(self, a, b, tokenizer, source, a_name, b_name) -> None:
    if b[:len(a)] == a:
      return
    j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    raise ValueError(
        f"{source}: template {self.name!r} is not prefix-stable: {a_name} is not a token-prefix "
        f"of {b_name} (they differ at token {j}: {_show(tokenizer, a[j:j + 3])} vs "
        f"{_show(tokenizer, b[j:j + 3])}), so the trained tokens would differ from what inference "
        "sees. Either text at a turn boundary merges into one token (e.g. a message starting "
        "with whitespace: strip it), or the template renders earlier turns differently once "
        "later ones follow (e.g. it drops reasoning from history: use a built-in or role-tag "
        "template instead)")

  def _probe_eot(self, tokenizer) -> set[int]:
    """The end-of-turn ids a tiny conversation actually ends its answer with."""
    probe = [Message("user", "Hi"), Message("assistant", "Hello")]
    layout = self.layout(probe, tokenizer, source=f"template {self.name!r} (probe)")
    return {layout.input_ids[layout.spans[-1][1] - 1]}

  def _check_train_on(self) -> None:
    if self.train_on not in TRAIN_ON:
      raise ValueError(f"template {self.name!r}: train_on {self.train_on!r} is not one of "
                       f"{TRAIN_ON}")


class TokenizerTemplate(Template):
  """The tokenizer's own Jinja chat template (or ``chat_template`` if given).

  Answers are located by prefix rendering, not ``{% generation %}`` tags
  (which almost no tokenizer has). The end-of-turn is the last special token
  the template emits after an answer. Probed once at construction, so a
  template that emits none, or is not prefix-stable, fails here.
  """

  supports_tools = True

  def __init__(self, tokenizer, train_on: str = "all_assistant", chat_template: str | None = None,
               name: str = "tokenizer"):
    self.name, self.train_on = name, train_on
    self._check_train_on()
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # some tokenizers ship several named templates
      template = template.get("default")
    if not template:
      raise ValueError(f"template {name!r}: the tokenizer has no chat_template; use a built-in "
                       f"template ({', '.join(BUILTINS)}) or define a role-tag template")
    self.chat_template = template
    self._probe_eot(tokenizer)

  def render_text(self, messages, tokenizer, add_generation_prompt=False, tools=None) -> str:
    return tokenizer.apply_chat_template(
        [m.as_dict() for m in messages], chat_template=self.chat_template, tokenize=False,
        add_generation_prompt=add_generation_prompt, tools=tools)

  def end_of_turn_ids(self, tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return ids

  def jinja(self) -> str:
    return self.chat_template


# Placeholders a role-tag format string may use, besides {content} / {system}.
_TOKENS = ("bos", "eos", "sep")


@dataclasses.dataclass
class RoleTagTemplate(Template):
  """A template given by format strings.

  ``user``, ``assistant`` and ``system`` each contain ``{content}`` once; the
  part of ``assistant`` before it is the generation prompt, and the part after
  must contain ``stop``, the end-of-turn (trained, with everything between the
  answer and it). ``prefix`` opens the conversation. With ``system=None`` a
  system message is merged into the first user turn with ``system_merge``.
  ``default_system`` is used when a conversation has none. ``{bos}``, ``{eos}``
  and ``{sep}`` stand for the strings ``bos``, ``eos`` and ``sep``; ``bos`` and
  ``eos`` default to the tokenizer's own (None). ``strip_content`` strips each
  message's content (Llama 3's ``| trim``).
  """
  name: str = "role_tag"
  user: str = "{content}"
  assistant: str = "{content}{eos}"
  system: str | None = None
  system_merge: str = "{system}\n\n{content}"
  prefix: str = "{bos}"
  stop: str = "{eos}"
  bos: str | None = None
  eos: str | None = None
  sep: str = "\n"
  default_system: str | None = None
  strip_content: bool = False
  train_on: str = "all_assistant"

  def __post_init__(self):
    self._check_train_on()
    where = f"template {self.name!r}"
    self._user = _parse(self.user, ("content",), where, "user")
    self._assistant = _parse(self.assistant, ("content",), where, "assistant")
    self._system = (None if self.system is None
                    else _parse(self.system, ("content",), where, "system"))
    self._merge = _parse(self.system_merge, ("system", "content"), where, "system_merge")
    self._prefix = _parse(self.prefix, (), where, "prefix")
    self._stop = _parse(self.stop, (), where, "stop")
    cut = next(i for i, (_, f) in enumerate(self._assistant) if f == "content")
    self._assistant_head, self._assistant_tail = self._assistant[:cut], self._assistant[cut + 1:]
    fixed = {"bos": self.bos, "eos": self.eos, "sep": self.sep}
    stop, tail = (self._literal(p, fixed) for p in (self._stop, self._assistant_tail))
    if not stop or stop not in tail:
      raise ValueError(
          f"{where}: the assistant format {self.assistant!r} has no end-of-turn after {{content}} "
          f"(stop={self.stop!r}), so the model would never learn to stop; end the answer with "
          "{eos} or an end-of-turn token and set stop to it, e.g. "
          "assistant='【BOT】：{content}{eos}'")

  @staticmethod
  def _literal(pieces, values) -> str:
    """The pieces as text, keeping unresolved placeholders as ``{name}``."""
    return "".join(p if f is None else (values.get(f) if values.get(f) is not None else f"{{{f}}}")
                   for p, f in pieces)

  def _values(self, tokenizer) -> dict[str, str]:
    bos = self.bos if self.bos is not None else (tokenizer.bos_token or "")
    eos = self.eos if self.eos is not None else tokenizer.eos_token
    if eos is None and any(f == "eos" for part in (self._assistant, self._stop) for _, f in part):
      raise ValueError(f"template {self.name!r} ends answers with the tokenizer's eos, but the "
                       "tokenizer has none; set the template's eos")
    return {"bos": bos, "eos": eos or "", "sep": self.sep}

  def render_text(self, messages, tokenizer, add_generation_prompt=False, tools=None) -> str:
    if uses_tools(messages, tools):
      raise ValueError(f"template {self.name!r} cannot render tool use; use the tokenizer's own "
                       "chat template (data.template='tokenizer')")
    values = self._values(tokenizer)
    fill = lambda pieces, **kw: "".join(  # noqa: E731
        p if f is None else (kw[f] if f in kw else values[f]) for p, f in pieces)
    clean = (lambda s: s.strip()) if self.strip_content else (lambda s: s)  # noqa: E731
    messages = list(messages)
    if messages and messages[0].role == "system":
      system, messages = clean(messages[0].content), messages[1:]
    else:
      system = None if self.default_system is None else clean(self.default_system)
    out = [fill(self._prefix)]
    if system is not None and self._system is not None:
      out.append(fill(self._system, content=system))
    for i, m in enumerate(messages):
      content = clean(m.content)
      if m.role == "user":
        if i == 0 and system is not None and self._system is None:
          content = fill(self._merge, system=system, content=content)
        out.append(fill(self._user, content=content))
      elif m.role == "assistant":
        out.append(fill(self._assistant, content=content))
    if add_generation_prompt:
      out.append(fill(self._assistant_head))
    return "".join(out)

  def end_of_turn_ids(self, tokenizer) -> set[int]:
    stop = "".join(p if f is None else self._values(tokenizer)[f] for p, f in self._stop)
    ids = _tokenize(tokenizer, [stop])[0]
    if len(ids) != 1:
      raise ValueError(
          f"template {self.name!r}: its end-of-turn {stop!r} is not one token of this tokenizer "
          f"(it splits into {len(ids)}), so generation could not stop on it; add it to the "
          "tokenizer as a special token, or use a template whose end-of-turn is the tokenizer's "
          f"eos ({tokenizer.eos_token!r})")
    return set(ids)

  def jinja(self) -> str:
    # Every literal is a quoted Jinja string inside {{ }}: no raw text sits
    # between tags, so HF's trim_blocks/lstrip_blocks cannot change it.
    def value(pieces, **names: str) -> str:
      out = []
      for literal, field in pieces:
        if literal:
          out.append(json.dumps(literal, ensure_ascii=False))
        if field in names:
          out.append(names[field])
        elif field in ("bos", "eos") and getattr(self, field) is None:
          out.append(f"({field}_token or '')")
        elif field is not None:
          out.append(json.dumps(getattr(self, field), ensure_ascii=False))
      return " + ".join(out) or "''"

    def emit(pieces, **names: str) -> str:
      return "{{ " + value(pieces, **names) + " }}" if pieces else ""

    trim = " | trim" if self.strip_content else ""
    content = f"(message['content']{trim})"
    default = ("none" if self.default_system is None
               else json.dumps(self.default_system, ensure_ascii=False) + trim)
    j = ["{% if messages and messages[0]['role'] == 'system' %}",
         f"{{% set system = messages[0]['content']{trim} %}}",
         "{% set loop_messages = messages[1:] %}",
         f"{{% else %}}{{% set system = {default} %}}",
         "{% set loop_messages = messages %}{% endif %}",
         emit(self._prefix)]
    if self._system is not None:
      j.append(f"{{% if system is not none %}}{emit(self._system, content='system')}{{% endif %}}")
    j.append("{% for message in loop_messages %}{% if message['role'] == 'user' %}")
    if self._system is None:
      j.append("{% if loop.first and system is not none %}"
               f"{{% set content = {value(self._merge, content=content, system='system')} %}}"
               f"{{% else %}}{{% set content = {content} %}}{{% endif %}}"
               f"{emit(self._user, content='content')}")
    else:
      j.append(emit(self._user, content=content))
    j.append(f"{{% elif message['role'] == 'assistant' %}}{emit(self._assistant, content=content)}"
             "{% endif %}{% endfor %}")
    j.append(f"{{% if add_generation_prompt %}}{emit(self._assistant_head)}{{% endif %}}")
    return "".join(j)


def _parse(fmt: str, fields: Iterable[str], where: str, key: str) -> list[tuple[str, str | None]]:
  """``fmt`` as (literal, placeholder-or-None) pieces; each of ``fields`` must
  occur exactly once, and only they and {bos}/{eos}/{sep} may occur."""
  if not isinstance(fmt, str):
    raise ValueError(f"{where}: {key} must be a format string, got {type(fmt).__name__}")
  try:
    parsed = list(string.Formatter().parse(fmt))
  except ValueError as e:
    raise ValueError(f"{where}: {key} {fmt!r} is not a valid format string ({e}); write a "
                     "literal brace as {{ or }}") from None
  pieces = []
  for literal, field, spec, conv in parsed:
    if field is not None and (field not in (*fields, *_TOKENS) or spec or conv):
      raise ValueError(f"{where}: {key} {fmt!r} uses {{{field}}}; the placeholders allowed are "
                       f"{', '.join('{' + f + '}' for f in (*fields, *_TOKENS))}")
    if literal:
      pieces.append((literal, None))
    if field is not None:
      pieces.append(("", field))
  for f in fields:
    n = sum(1 for _, g in pieces if g == f)
    if n != 1:
      raise ValueError(f"{where}: {key} {fmt!r} must contain {{{f}}} exactly once (found {n})")
  return pieces


BUILTINS: dict[str, dict[str, Any]] = {
    # ChatML as Qwen uses it, without a default system prompt.
    "chatml": dict(
        prefix="", system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n", stop="<|im_end|>"),
    # Qwen1.5/Qwen2 chat: ChatML with Qwen's default system prompt.
    "qwen2": dict(
        prefix="", system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n", stop="<|im_end|>",
        default_system="You are a helpful assistant."),
    # Llama 3 (Meta-Llama-3-*-Instruct); contents are trimmed, as its template does.
    "llama3": dict(
        prefix="{bos}",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
        stop="<|eot_id|>", strip_content=True),
    # Mistral-7B-Instruct-v0.1/v0.2: [INST] … [/INST]answer</s>. Its template
    # has no system role; a system message goes before the first user message.
    "mistral": dict(
        prefix="{bos}", system=None, system_merge="{system}\n\n{content}",
        user="[INST] {content} [/INST]", assistant="{content}{eos}", stop="{eos}"),
}


def get_template(spec: str | Mapping[str, Any], tokenizer=None,
                 train_on: str | None = None) -> Template:
  """A template from a name (``tokenizer`` or a built-in: chatml, qwen2,
  llama3, mistral) or a role-tag definition (dict/ConfigDict of
  ``RoleTagTemplate`` fields). ``train_on`` overrides the definition's."""
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  extra = {} if train_on is None else {"train_on": train_on}
  if isinstance(spec, str):
    if spec == "tokenizer":
      if tokenizer is None:
        raise ValueError("template 'tokenizer' needs the tokenizer")
      return TokenizerTemplate(tokenizer, **extra)
    if spec not in BUILTINS:
      raise ValueError(f"template {spec!r} is not one of tokenizer, {', '.join(BUILTINS)}; or give "
                       "a role-tag definition (a dict of RoleTagTemplate fields)")
    return RoleTagTemplate(name=spec, **{**BUILTINS[spec], **extra})
  if isinstance(spec, Mapping):
    known = {f.name for f in dataclasses.fields(RoleTagTemplate)}
    unknown = sorted(set(spec) - known)
    if unknown:
      raise ValueError(f"role-tag template: unknown keys {unknown}; the keys are {sorted(known)}")
    return RoleTagTemplate(**{**spec, **extra})
  raise ValueError(f"template must be a name or a role-tag definition, got {type(spec).__name__}")


def encode(conversation: Conversation, template: Template, tokenizer, *,
           max_length: int | None = None, truncation: str = "drop",
           counts: Counts | None = None):
  """Tokenize one example: an ``Encoded``, a (chosen, rejected) pair of them
  for pairwise examples, or None when it is dropped (the reason is counted in
  ``counts``).

  Chats without an assistant turn are dropped. Longer than ``max_length``:
  ``truncation="drop"`` drops the example; ``"keep_answer"`` keeps the last
  answer whole and shortens the prompt — first by leaving out the oldest
  exchanges (the system message stays), then by cutting the last user
  message from its start and rendering again, so the prompt stays well
  formed (bos, system message, role headers, generation prompt). An example
  whose last answer does not fit even with an empty user message is dropped:
  cutting the answer would train the model to stop mid-sentence (with the
  end-of-turn) or never to stop (without it). A conversation with tool calls
  is dropped rather than shortened: leaving out its oldest turns could
  separate a call from its result (one that only lists tool schemas is
  shortened, the schemas kept).
  Raw text under ``keep_answer`` keeps its first ``max_length`` tokens (no eos:
  the document did not end there).
  """
  counts = counts if counts is not None else Counts()
  counts.examples += 1
  if truncation not in TRUNCATION:
    raise ValueError(f"truncation {truncation!r} is not one of {TRUNCATION}")
  source = conversation.source
  if conversation.kind == "text":
    ids = _cut_text(_text_ids(conversation.text, tokenizer, source), max_length, truncation,
                    counts)
    return None if ids is None else Encoded(ids, [1] * len(ids), source)

  messages = list(conversation.messages)
  if conversation.kind == "chat":
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    if last is None:
      counts.dropped_no_assistant += 1
      return None
    variants = [messages[:last + 1]]  # a trailing user turn would train nothing
  elif conversation.kind == "label":
    variants = [messages + [Message("assistant", label_answer(conversation.labels))]]
  elif conversation.kind == "pairwise":
    variants = [messages + [Message("assistant", conversation.chosen)],
                messages + [Message("assistant", conversation.rejected)]]
  else:
    raise ValueError(f"{source}: unknown example kind {conversation.kind!r}")

  tools = conversation.tool_schemas
  layouts = [template.layout(v, tokenizer, source, tools) for v in variants]
  if max_length is not None and max(len(lay.input_ids) for lay in layouts) > max_length:
    # Leaving out a tool conversation's oldest turns could split a call from
    # its results: such a conversation is dropped rather than cut.
    if truncation == "drop" or conversation.calls_tools:
      counts.dropped_too_long += 1
      return None
    layouts = _keep_answer(template, variants, tokenizer, max_length, source, tools)
    if layouts is None:
      counts.dropped_too_long += 1
      return None
    counts.truncated += 1
  encoded = [Encoded(lay.input_ids, template.loss_mask(len(lay.input_ids), lay.spans), source)
             for lay in layouts]
  return tuple(encoded) if conversation.kind == "pairwise" else encoded[0]


HEAD_KINDS = {"cls": "label", "reward": "pairwise"}


def encode_head(conversation: Conversation, head: str, template: Template | None, tokenizer, *,
                max_length: int | None = None, truncation: str = "drop",
                counts: Counts | None = None) -> Encoded | None:
  """Tokenize one example for a task head (module doc): an ``Encoded`` whose
  mask is 1 at the last token of each sequence — one for ``cls``, two (chosen,
  then rejected, concatenated) for ``reward`` — or None when it is dropped.

  Longer than ``max_length`` (a pair: both sequences together):
  ``truncation="drop"`` drops it; ``"keep_answer"`` keeps a text's first
  ``max_length`` tokens, and shortens a pair's prompt as ``encode`` does
  (each sequence to ``max_length // 2``).
  """
  counts = counts if counts is not None else Counts()
  source = conversation.source
  want = HEAD_KINDS[head]
  if conversation.kind != want:
    raise ValueError(f"{source}: a {conversation.kind} row where objective {head!r} needs "
                     f"{want} rows ({'text + label(s)' if want == 'label' else 'prompt + chosen + rejected'}); "
                     "give this stage only such datasets (format label / pairwise)")
  if truncation not in TRUNCATION:
    raise ValueError(f"truncation {truncation!r} is not one of {TRUNCATION}")
  counts.examples += 1
  if head == "cls":
    ids = list(tokenizer(conversation.text)["input_ids"])
    if not ids:
      raise ValueError(f"{source}: the text is empty (no tokens), so there is nothing to "
                       "classify; remove the row")
    ids = _cut_text(ids, max_length, truncation, counts)
    return None if ids is None else Encoded(ids, [0] * (len(ids) - 1) + [1], source)

  messages = list(conversation.messages)
  variants = [messages + [Message("assistant", conversation.chosen)],
              messages + [Message("assistant", conversation.rejected)]]
  layouts = [template.layout(v, tokenizer, source) for v in variants]
  if max_length is not None and sum(len(lay.input_ids) for lay in layouts) > max_length:
    if truncation == "drop":
      counts.dropped_too_long += 1
      return None
    layouts = _keep_answer(template, variants, tokenizer, max_length // 2, source)
    if layouts is None:
      counts.dropped_too_long += 1
      return None
    counts.truncated += 1
  ids, mask = [], []
  for lay in layouts:
    ids += lay.input_ids
    mask += [0] * (len(lay.input_ids) - 1) + [1]
  return Encoded(ids, mask, source)


def _keep_answer(template, variants, tokenizer, max_length, source,
                 tools=None) -> list[Layout] | None:
  """Shorten the prompt of every variant (the same way, so a pair stays a
  pair) until each fits in ``max_length``; None if the last answer cannot.
  ``tools`` (schemas) stay in every rendering."""
  system = variants[0][:1] if variants[0][0].role == "system" else []
  turns = [v[len(system):] for v in variants]  # user, assistant, ..., user, assistant

  def fit(start: int, user: str | None = None) -> tuple[list[Layout], int]:
    layouts = []
    for t in turns:
      t = t[start:]
      if user is not None:
        t = [Message("user", user)] + t[1:]
      lay = template.layout(system + t, tokenizer, source, tools)
      # What follows the last answer's end-of-turn is untrained: it goes first.
      layouts.append(Layout(lay.input_ids[:lay.spans[-1][1]], lay.spans))
    return layouts, max(len(lay.input_ids) for lay in layouts) - max_length

  # 1. Leave out the oldest exchanges, the system message staying.
  start = 0
  layouts, over = fit(start)
  while over > 0 and start < len(turns[0]) - 2:
    start += 2
    layouts, over = fit(start)
  if over <= 0:
    return layouts
  # 2. Cut the last user message from its start (the text nearest the answer
  # stays), re-rendering so the prompt keeps its whole structure: system
  # message, role headers and generation prompt.
  content = turns[0][start].content
  offsets = tokenizer(content, add_special_tokens=False,
                      return_offsets_mapping=True)["offset_mapping"]
  k = over
  while k < len(offsets):
    layouts, over = fit(start, content[offsets[k][0]:])
    if over <= 0:
      return layouts
    k += over
  layouts, over = fit(start, "")
  return layouts if over <= 0 else None


def _cut_text(ids: list[int], max_length: int | None, truncation: str,
              counts: Counts) -> list[int] | None:
  """A text's token ids within ``max_length``: dropped (None) under
  ``truncation="drop"``, else its first ``max_length`` tokens; counted."""
  if max_length is None or len(ids) <= max_length:
    return ids
  if truncation == "drop":
    counts.dropped_too_long += 1
    return None
  counts.truncated += 1
  return ids[:max_length]


def _text_ids(text: str, tokenizer, source: str) -> list[int]:
  if tokenizer.eos_token_id is None:
    raise ValueError(f"{source}: raw text is trained with an eos after each document, but the "
                     "tokenizer has no eos token")
  ids = list(tokenizer(text)["input_ids"])
  if not ids or ids[-1] != tokenizer.eos_token_id:
    ids.append(tokenizer.eos_token_id)
  return ids


def tool_names(messages: Sequence[Message], tools: list | None) -> list[str]:
  """The function names a rendering of ``messages`` with ``tools`` must
  contain: every schema's and every call's (a template that writes none of
  them ignores tool use)."""
  names = [(t.get("function") or t).get("name") for t in tools or [] if isinstance(t, Mapping)]
  for m in messages:
    for call in json.loads(m.tool_calls) if m.tool_calls else []:
      names.append(call["function"]["name"])
  return [n for n in dict.fromkeys(names) if isinstance(n, str)]


def _messages(messages) -> list[Message]:
  return [m if isinstance(m, Message) else
          Message(m["role"], m.get("content") or "",
                  None if m.get("tool_calls") is None else json.dumps(m["tool_calls"]))
          for m in messages]


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
  """Tokenize whole rendered texts as ``apply_chat_template`` does: the
  template writes its own special tokens, so none are added."""
  if not texts:
    return []
  return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _show(tokenizer, ids: Sequence[int]) -> str:
  return repr([tokenizer.decode([i]) for i in ids])
