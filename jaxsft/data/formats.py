"""Dataset rows of any supported shape → canonical ``Conversation``s.

Every format becomes one structure, so templates, masks and reports are
written once:

  chat      ``messages``: an optional first system message, then user and
            assistant turns alternating, starting with the user
  text      ``text`` only (continued pre-training: every token trained)
  pairwise  prompt ``messages`` (ending with a user turn) + ``chosen``/``rejected``
  label     ``text`` + ``labels``; ``messages`` holds the prompt ([system,] user:
            text) so the labels can be trained as a generated JSON answer

Row formats and their fields (``columns`` renames any of them, e.g.
``columns={"instruction": "question"}`` reads the file's ``question`` column):

  alpaca    instruction, input (optional), output, system (optional),
            history (optional: [[user, assistant], ...] before this exchange),
            tools (optional: schemas the answer was written knowing of).
            The user turn is ``instruction + "\\n" + input`` (either may be
            empty), LLaMA-Factory's convention, so data prepared for it renders
            the same here.
  sharegpt  conversations: [{from, value}], from in human/user, gpt/assistant,
            system, function_call, observation; system, tools (optional
            columns). ``from``/``value`` can be renamed through ``columns`` too.
  messages  messages: [{role, content}] (OpenAI style), role in system, user,
            assistant, tool; an assistant message may carry ``tool_calls``;
            system, tools (optional columns). ``role``/``content`` renamable.
  text      text
  pairwise  prompt (a string, or [{role, content}] ending with a user turn),
            chosen, rejected, system (optional)
  label     text, label (a string or integer) or labels (a list of them),
            system (optional)

Tool use (function calling), as OpenAI's messages and LLaMA-Factory's
sharegpt write it: ``tools`` is the list of function schemas the model may
call (a list, or a JSON string of one); an assistant turn may call them
(``tool_calls``: [{"type": "function", "function": {"name", "arguments"}}];
sharegpt's ``function_call`` turn holds one call or a list of them as JSON,
{"name", "arguments"}; a call's ``id`` is kept), and ``tool`` turns (sharegpt
``observation``) hold what they returned, before the assistant's next turn
(with OpenAI's ``tool_call_id`` and ``name``, if given, for the template). The calls are trained
like any answer, the tool results are not. Rendering them takes the
tokenizer's own chat template (``templates.TokenizerTemplate``).

System prompts: a row's own system message (or ``system`` column) wins; the
dataset's ``system_prompt`` is used only for rows without one. An empty or null
system counts as none.

Errors a user can cause are ``ValueError``s that start with the row's source
(``FILE:LINE`` or ``FILE:row N``), name the field, and say what to do.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

ROLES = ("system", "user", "assistant", "tool")
KINDS = ("chat", "text", "pairwise", "label")

# format -> the canonical field names ``columns`` may rename.
FIELDS = {
    "alpaca": ("instruction", "input", "output", "system", "history", "tools"),
    "sharegpt": ("conversations", "system", "from", "value", "tools"),
    "messages": ("messages", "system", "role", "content", "tools"),
    "text": ("text",),
    "pairwise": ("prompt", "chosen", "rejected", "system", "role", "content"),
    "label": ("text", "label", "labels", "system"),
}
FORMATS = tuple(FIELDS)

# What a tool turn may carry besides its content (OpenAI's tool message).
TOOL_FIELDS = ("tool_call_id", "name")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool"}


@dataclasses.dataclass(frozen=True)
class Message:
  """One turn of a conversation. ``tool_calls``: an assistant turn's function
  calls, as the JSON text of OpenAI's list (kept as text so that rows of any
  arguments share one Arrow schema). ``tool_fields``: a tool turn's
  ``tool_call_id`` and ``name`` as JSON text, for templates that pair results
  with calls (Mistral's)."""
  role: str
  content: str
  tool_calls: str | None = None
  tool_fields: str | None = None

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"message role {self.role!r} is not one of {ROLES}")
    if not isinstance(self.content, str):
      raise ValueError(f"message content must be a string, got {type(self.content).__name__}")
    if self.tool_calls is not None and self.role != "assistant":
      raise ValueError(f"a {self.role} message cannot carry tool_calls")
    if self.tool_fields is not None and self.role != "tool":
      raise ValueError(f"a {self.role} message cannot carry {TOOL_FIELDS}")

  def as_dict(self) -> dict[str, Any]:
    """``{"role": ..., "content": ...}`` (and ``tool_calls``), the form chat templates take."""
    d: dict[str, Any] = {"role": self.role, "content": self.content}
    if self.tool_calls is not None:
      d["tool_calls"] = json.loads(self.tool_calls)
    if self.tool_fields is not None:
      d.update(json.loads(self.tool_fields))
    return d


@dataclasses.dataclass
class Conversation:
  """The canonical example every format is converted to (see the module doc)."""
  messages: list[Message] = dataclasses.field(default_factory=list)
  kind: str = "chat"
  text: str | None = None
  chosen: str | None = None
  rejected: str | None = None
  labels: list[str] | None = None
  source: str = ""
  tools: str | None = None  # the JSON text of the function schemas a chat may call

  def to_dict(self) -> dict[str, Any]:
    """A plain dict (JSON- and Arrow-friendly); ``from_dict`` inverts it."""
    d = dataclasses.asdict(self)
    d["messages"] = [{"role": m.role, "content": m.content, "tool_calls": m.tool_calls,
                      "tool_fields": m.tool_fields} for m in self.messages]
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Conversation":
    """The inverse of ``to_dict``."""
    d = dict(d)
    d["messages"] = [Message(m["role"], m["content"], m.get("tool_calls"), m.get("tool_fields"))
                     for m in d.get("messages") or []]
    return cls(**d)

  @property
  def tool_schemas(self) -> list | None:
    """``tools`` as the list ``apply_chat_template(tools=...)`` takes."""
    return None if self.tools is None else json.loads(self.tools)

  @property
  def uses_tools(self) -> bool:
    return uses_tools(self.messages, self.tools)

  @property
  def calls_tools(self) -> bool:
    """Whether a turn calls a tool or holds a tool's result (not just schemas)."""
    return any(m.role == "tool" or m.tool_calls for m in self.messages)


def uses_tools(messages, tools) -> bool:
  """Whether a conversation has tool schemas, tool calls or tool results."""
  return bool(tools) or any(m.role == "tool" or m.tool_calls for m in messages)


def label_answer(labels: list[str]) -> str:
  """The assistant answer a labelled example is trained to generate: a JSON
  object ``{"labels": [...]}`` (always the list form, so one parser reads
  single- and multi-label answers alike)."""
  return json.dumps({"labels": list(labels)}, ensure_ascii=False)


def detect_format(row: Mapping[str, Any], columns: Mapping[str, str] | None = None,
                  source: str = "") -> str:
  """The format of ``row`` from its fields (after ``columns`` renaming)."""
  columns = columns or {}
  has = lambda field: columns.get(field, field) in row  # noqa: E731
  if has("conversations"):
    return "sharegpt"
  if has("messages"):
    return "messages"
  if has("instruction") and has("output"):
    return "alpaca"
  if has("chosen") and has("rejected"):
    return "pairwise"
  if has("text") and (has("label") or has("labels")):
    return "label"
  if has("text"):
    return "text"
  raise ValueError(f"{source}: cannot tell the format from the fields {sorted(row)}; set the "
                   f"dataset's format to one of {FORMATS} (and map differently named "
                   f"fields with columns={{canonical: column}})")


def check_columns(fmt: str, columns: Mapping[str, str] | None, where: str = "dataset") -> None:
  """Reject ``columns`` keys that are not fields of ``fmt`` (typos would
  otherwise be ignored silently)."""
  if fmt not in FIELDS and fmt != "auto":
    raise ValueError(f"{where}: format {fmt!r} is not one of {FORMATS + ('auto',)}")
  known = FIELDS.get(fmt) or sorted({f for fs in FIELDS.values() for f in fs})
  for key, value in (columns or {}).items():
    if key not in known:
      raise ValueError(f"{where}: columns key {key!r} is not a field of format {fmt}; "
                       f"the keys are canonical field names: {tuple(known)}")
    if not isinstance(value, str):
      raise ValueError(f"{where}: columns[{key!r}] must be the file's column name (a string), "
                       f"got {type(value).__name__}")


def to_conversation(row: Mapping[str, Any], fmt: str, source: str = "",
                    columns: Mapping[str, str] | None = None,
                    system_prompt: str | None = None) -> Conversation:
  """Convert one row of format ``fmt`` into a ``Conversation``.

  ``columns`` maps canonical field names to the row's names; ``system_prompt``
  is used when the row has no system message of its own. ``source`` (e.g.
  ``data.jsonl:17``) prefixes every error and is kept on the result.
  """
  if not isinstance(row, Mapping):
    raise ValueError(f"{source}: expected an object with named fields, got {type(row).__name__}")
  r = _Row(row, source, fmt, columns or {})
  if fmt == "alpaca":
    conv = _alpaca(r)
  elif fmt == "sharegpt":
    conv = _sharegpt(r)
  elif fmt == "messages":
    conv = _messages(r)
  elif fmt == "text":
    return Conversation(kind="text", text=r.string("text"), source=source)
  elif fmt == "pairwise":
    conv = _pairwise(r)
  elif fmt == "label":
    conv = _label(r)
  else:
    raise ValueError(f"{source}: format {fmt!r} is not one of {FORMATS}")
  if fmt in ANSWER_FIELDS:
    _check_answers(conv.messages, r, ANSWER_FIELDS[fmt])
  if system_prompt and not (conv.messages and conv.messages[0].role == "system"):
    conv.messages.insert(0, Message("system", system_prompt))
  return conv


# The field that holds a chat format's assistant answers.
ANSWER_FIELDS = {"alpaca": "output", "sharegpt": "conversations", "messages": "messages"}


def _check_answers(messages: list[Message], r: "_Row", field: str) -> None:
  """Refuse an empty assistant answer (one that calls tools aside): every
  answer is trained, so it would teach the model to reply with nothing."""
  for pos, m in enumerate(messages):
    if m.role == "assistant" and not m.content.strip() and not m.tool_calls:
      if field == "output" and pos == len(messages) - 1:
        name, what = field, "is empty"
      else:  # alpaca's history, or a chat's messages
        name = "history" if field == "output" else field
        what = f"has an empty assistant answer (message {pos})"
      raise r.error(name, f"{what}: trained, it would teach the model to reply with nothing; "
                    "fill in the answer or remove the row")


class _Row:
  """Typed field access with errors that name the source, the file's column
  name and the canonical field it stands for."""

  def __init__(self, row: Mapping[str, Any], source: str, fmt: str, columns: Mapping[str, str]):
    self.row, self.source, self.fmt, self.columns = row, source, fmt, columns

  def name(self, field: str) -> str:
    col = self.columns.get(field, field)
    return f"'{col}'" + (f" (columns[{field!r}])" if col != field else "")

  def error(self, field: str, what: str) -> ValueError:
    return ValueError(f"{self.source}: field {self.name(field)} {what}")

  def get(self, field: str, required: bool) -> Any:
    col = self.columns.get(field, field)
    if col not in self.row:
      if not required:
        return None
      hint = (f"map it with columns={{{field!r}: 'your_column'}}" if field == col
              else "fix the columns mapping")
      raise ValueError(f"{self.source}: missing field {self.name(field)} (format {self.fmt}); "
                       f"the row has fields {sorted(self.row)}; {hint}")
    value = self.row[col]
    if value is None and required:
      raise self.error(field, "is null; every row needs it")
    return value

  def string(self, field: str, required: bool = True) -> str | None:
    value = self.get(field, required)
    if value is not None and not isinstance(value, str):
      raise self.error(field, f"must be a string, got {_type(value)}")
    return value

  def system(self) -> str | None:
    return self.string("system", required=False) or None

  def message_list(self, field: str, role_key: str, content_key: str, role_map: Mapping[str, str],
                   required: bool = True) -> list[Message]:
    value = self.get(field, required)
    if value is None:
      return []
    if not isinstance(value, list):
      raise self.error(field, f"must be a list of {{{role_key}, {content_key}}} objects, "
                       f"got {_type(value)}")
    role_col = self.columns.get(role_key, role_key)
    content_col = self.columns.get(content_key, content_key)
    out = []
    for i, item in enumerate(value):
      at = f"{self.name(field)}[{i}]"
      if not isinstance(item, Mapping):
        raise ValueError(f"{self.source}: {at} must be an object with '{role_col}' and "
                         f"'{content_col}', got {_type(item)}")
      for col in (role_col, content_col):
        if item.get(col) is None:
          raise ValueError(f"{self.source}: {at} has no '{col}' (it has {sorted(item)})")
      role, content = item[role_col], item.get(content_col)
      if not isinstance(role, str) or role not in role_map:
        raise ValueError(f"{self.source}: {at}.{role_col} is {role!r}; expected one of "
                         f"{tuple(role_map)}")
      calls = None
      if role == "function_call":  # sharegpt: the call is the turn's value
        calls, content = _tool_calls(_json_value(content, f"{self.source}: {at}.{content_col}"),
                                     f"{self.source}: {at}.{content_col}", sharegpt=True), ""
      elif item.get("tool_calls") is not None and role_map[role] == "assistant":
        calls = _tool_calls(item["tool_calls"], f"{self.source}: {at}.tool_calls")
        content = "" if content is None else content
      fields = None
      if role_map[role] == "tool" and any(isinstance(item.get(k), str) for k in TOOL_FIELDS):
        fields = json.dumps({k: item[k] for k in TOOL_FIELDS if isinstance(item.get(k), str)})
      if content is None:
        raise ValueError(f"{self.source}: {at} has no '{content_col}' (it has {sorted(item)})")
      if not isinstance(content, str):
        raise ValueError(f"{self.source}: {at}.{content_col} must be a string, "
                         f"got {_type(content)}")
      out.append(Message(role_map[role], content, calls, fields))
    return out

  def tools(self) -> str | None:
    """The row's ``tools`` column as JSON text of a list of schemas, or None."""
    value = self.get("tools", required=False)
    if value is None or value == "" or value == []:
      return None
    if isinstance(value, str):
      value = _json_value(value, f"{self.source}: field {self.name('tools')}")
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
      raise self.error("tools", f"must be a list of function schemas (objects), or a JSON "
                       f"string of one; got {_type(value)}")
    return json.dumps(value, ensure_ascii=False)


def _json_value(value: Any, at: str) -> Any:
  """``value`` parsed if it is JSON text, else as is."""
  if not isinstance(value, str):
    return value
  try:
    return json.loads(value)
  except json.JSONDecodeError as e:
    raise ValueError(f"{at} is not valid JSON ({e.msg} at character {e.pos}): "
                     f"{value[:80]!r}") from None


def _tool_calls(value: Any, at: str, sharegpt: bool = False) -> str:
  """OpenAI's tool_calls list (as JSON text) from OpenAI's form, or from
  sharegpt's {"name", "arguments"} (one call or a list of them)."""
  value = _json_value(value, at)
  calls = value if isinstance(value, list) else [value] if sharegpt else None
  if not calls:
    raise ValueError(f"{at} must be a non-empty list of calls, got {_type(value)}")
  out = []
  for j, call in enumerate(calls):
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
      raise ValueError(f"{at}[{j}] must be a call with a function name: "
                       + ('{"name": ..., "arguments": {...}}' if sharegpt else
                          '{"type": "function", "function": {"name": ..., "arguments": ...}}')
                       + f", got {call!r:.80}")
    out.append({**({"id": call["id"]} if isinstance(call.get("id"), str) else {}),
                "type": "function",
                "function": {"name": fn["name"], "arguments": fn.get("arguments", {})}})
  return json.dumps(out, ensure_ascii=False)


def _type(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def _with_system(messages: list[Message], system: str | None) -> list[Message]:
  """Messages with the row's ``system`` column first, unless they start with
  their own system message (which wins: it is the more specific of the two)."""
  if system and not (messages and messages[0].role == "system"):
    return [Message("system", system)] + messages
  return messages


def _check_turns(messages: list[Message], r: _Row, field: str, end_with_user: bool = False):
  """Enforce the canonical structure: [system], user, assistant, user, ...; an
  assistant turn with tool calls is followed by one or more tool turns and
  then an assistant turn."""
  body = messages[1:] if messages and messages[0].role == "system" else messages
  previous = None
  for i, m in enumerate(body):
    pos = i + len(messages) - len(body)
    if m.role == "system":
      raise r.error(field, f"has a system message at position {pos}; a system message may only "
                    "come first (merge it into the first one)")
    if previous is None or previous.role == "assistant" and not previous.tool_calls:
      expected = ("user",)
    elif previous.role == "user":
      expected = ("assistant",)
    elif previous.role == "assistant":  # it called tools: their results come next
      expected = ("tool",)
    else:  # a tool result: more results, or the assistant's next turn
      expected = ("tool", "assistant")
    if m.role not in expected:
      after = ("an assistant turn with tool calls" if expected == ("tool",)
               else "a tool result" if previous is not None and previous.role == "tool" else "")
      raise r.error(field, f"must alternate user and assistant turns, starting with the user "
                    f"(after an optional system message), with tool results only after an "
                    f"assistant turn that calls tools; message {pos} is {m.role!r} where "
                    f"{' or '.join(map(repr, expected))} was expected"
                    + (f" after {after}" if after else ""))
    previous = m
  if end_with_user and (not body or body[-1].role != "user"):
    raise r.error(field, "must end with a user turn (the chosen and rejected answers follow it)")


def _alpaca(r: _Row) -> Conversation:
  instruction = r.string("instruction")
  extra = r.string("input", required=False)
  output = r.string("output")
  messages = []
  history = r.get("history", required=False)
  if history is not None:
    if not isinstance(history, list):
      raise r.error("history", f"must be a list of [user, assistant] pairs, got {_type(history)}")
    for i, pair in enumerate(history):
      if (not isinstance(pair, (list, tuple)) or len(pair) != 2
          or not all(isinstance(x, str) for x in pair)):
        raise r.error("history", f"item {i} must be a [user, assistant] pair of strings, "
                      f"got {pair!r:.80}")
      messages += [Message("user", pair[0]), Message("assistant", pair[1])]
  prompt = "\n".join(x for x in (instruction, extra) if x)
  messages += [Message("user", prompt), Message("assistant", output)]
  return Conversation(_with_system(messages, r.system()), source=r.source, tools=r.tools())


def _sharegpt(r: _Row) -> Conversation:
  messages = r.message_list("conversations", "from", "value", SHAREGPT_ROLES)
  messages = _with_system(messages, r.system())
  _check_turns(messages, r, "conversations")
  return Conversation(messages, source=r.source, tools=r.tools())


def _messages(r: _Row) -> Conversation:
  messages = r.message_list("messages", "role", "content", {k: k for k in ROLES})
  messages = _with_system(messages, r.system())
  _check_turns(messages, r, "messages")
  return Conversation(messages, source=r.source, tools=r.tools())


def _pairwise(r: _Row) -> Conversation:
  prompt = r.get("prompt", required=True)
  if isinstance(prompt, str):
    messages = [Message("user", prompt)]
  elif isinstance(prompt, list):
    messages = r.message_list("prompt", "role", "content", {k: k for k in ROLES})
  else:
    raise r.error("prompt", f"must be a string or a list of {{role, content}} messages, "
                  f"got {_type(prompt)}")
  messages = _with_system(messages, r.system())
  _check_turns(messages, r, "prompt", end_with_user=True)
  chosen, rejected = r.string("chosen"), r.string("rejected")
  if chosen.strip() == rejected.strip():
    raise r.error("rejected", "is the same as 'chosen': the pair teaches the reward model "
                  "nothing (its loss stays at ln 2); remove the row or fix the answers")
  return Conversation(messages, kind="pairwise", chosen=chosen, rejected=rejected,
                      source=r.source)


def _label(r: _Row) -> Conversation:
  text = r.string("text")
  value = r.get("labels", required=False)
  field = "labels"
  if value is None:
    value, field = r.get("label", required=True), "label"
    value = [value]
  elif not isinstance(value, list):
    raise r.error("labels", f"must be a list of labels, got {_type(value)} (a single label "
                  "goes in 'label')")
  labels = []
  for x in value:
    # Integers are common class ids (0/1); booleans are almost always a bug.
    if isinstance(x, bool) or not isinstance(x, (str, int)):
      raise r.error(field, f"labels must be strings or integers, got {_type(x)}")
    labels.append(str(x))
  if not labels:
    raise r.error(field, "is empty; every labelled row needs at least one label")
  messages = _with_system([Message("user", text)], r.system())
  return Conversation(messages, kind="label", text=text, labels=labels, source=r.source)
