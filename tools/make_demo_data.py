"""Generate the embedded demo's data: a fictional telecom shop's support world.

    python tools/make_demo_data.py [--out data/demo]

Everything comes from the fact tables below and a fixed seed, in pure Python
(plus ``tokenizers`` for the tokenizer), so a rerun writes byte-identical
files; ``tests/test_demo_data.py`` regenerates them and compares them with the
committed copy, so the data cannot drift from this script. Files written:

  corpus.jsonl          text: knowledge-base articles, plan and device pages,
                        error-code notes and resolved tickets (continued pre-training)
  instructions.jsonl    alpaca: questions answered from the same facts (domain SFT)
  intent_train.jsonl    messages: a customer message -> a JSON object of labels,
  intent_test.jsonl       ``{"domain": ..., "intents": [...], "priority": ...}``
                        (generative classification; held-out test split)
  intent_cls_train.jsonl  label: the same messages with ``labels`` = the intents
  intent_cls_test.jsonl     (for a classification head)
  general.jsonl         alpaca: arithmetic, string reversal, simple facts (general SFT)
  tokenizer/            byte-level BPE trained on all of the above, ChatML template

Why it is shaped like this. The demo trains a model of about a million
parameters from scratch for a few minutes on CPU, so the world is small and
regular enough to be learnt visibly: a few dozen facts, each stated in several
phrasings, and answers written in one consistent style. The intent labels are
a pure function of the phrases an utterance was assembled from (each phrase
belongs to exactly one intent, each intent to one domain, and urgency phrases
set the priority), so the task is learnable and exact-match on the held-out
split measures whether it was learnt. Intents are listed in the order they
are mentioned. The test utterances never occur in the training split.

Tokenizer decisions. Special tokens ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2),
``<|im_start|>`` (3), ``<|im_end|>`` (4). The chat template is ChatML as Qwen
writes it (no default system prompt). ``tokenizer(text)`` adds no ``<s>``:
ChatML models (Qwen) add none, and then a raw-text document and a rendered
chat start the same way; the data pipeline still appends ``</s>`` to every
text document so the model learns where documents end. Generation stops at
``<|im_end|>`` (end of turn) or ``</s>``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
from typing import Iterable

SEED = 1234
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# The system prompts the demo config gives each task (rows carry none, so a
# recipe can change them without regenerating data). They are part of the
# tokenizer's training text.
SYSTEM_PROMPTS = {
    "support": "You are the Nimbus Mobile support assistant.",
    "intent": "Label the customer message in JSON.",
    "general": "You are a helpful assistant.",
}
COMPANY = "Nimbus Mobile"
N_INTENT_TEST = 200
N_INTENT_TRAIN = 1400

# ----------------------------------------------------------------------------- facts

# name, monthly price ($), data (GB, 0 = unlimited), minutes, roaming countries, 5G, hotspot GB
PLANS = [
    ("Spark 5", 15, 5, "300 minutes", 0, False, 0),
    ("Spark 15", 22, 15, "unlimited minutes", 0, False, 5),
    ("Orbit 30", 30, 30, "unlimited minutes", 10, True, 10),
    ("Orbit 60", 40, 60, "unlimited minutes", 10, True, 20),
    ("Nova Unlimited", 55, 0, "unlimited minutes", 30, True, 40),
    ("Atlas Business", 65, 0, "unlimited minutes", 60, True, 100),
    ("Pulse Prepaid", 10, 3, "100 minutes", 0, False, 0),
]

# name, kind, price ($), warranty (months), colors
DEVICES = [
    ("Nimbus X1", "phone", 299, 12, ["black", "silver"]),
    ("Nimbus X2 Pro", "phone", 549, 24, ["graphite", "blue", "white"]),
    ("Comet Lite", "phone", 179, 12, ["black", "green"]),
    ("Halo Buds", "pair of earbuds", 79, 12, ["white", "black"]),
    ("Halo Buds Max", "pair of earbuds", 149, 24, ["white", "navy"]),
    ("SkyLink Router", "5G home router", 199, 24, ["white"]),
    ("SkyLink Mini", "mobile hotspot", 99, 12, ["black"]),
    ("Vela Watch", "smartwatch", 229, 12, ["rose", "black", "silver"]),
    ("Beacon Tab 10", "tablet", 349, 24, ["grey", "silver"]),
    ("ChargePad Duo", "wireless charger", 39, 6, ["white"]),
]

# code, what it means, what fixes it
ERRORS = [
    ("E101", "the SIM card is not provisioned yet",
     "restart the phone and wait 15 minutes; if it stays, contact the activation team"),
    ("E102", "the SIM card is locked by its PIN",
     "enter the PUK code printed on the SIM card holder"),
    ("E203", "the monthly data limit is reached",
     "buy a data add-on in the app or upgrade the plan"),
    ("E204", "roaming is switched off on the line",
     "switch on roaming under Settings > Roaming in the Nimbus app"),
    ("E305", "the card payment was declined by the bank",
     "update the payment card under Billing > Payment methods"),
    ("E306", "the payment card on file has expired",
     "add a new card under Billing > Payment methods"),
    ("E307", "a duplicate charge was detected",
     "wait: the duplicate is refunded automatically within 5 business days"),
    ("E410", "the router lost its connection to the network",
     "unplug the router for 30 seconds and plug it back in"),
    ("E411", "a firmware update failed",
     "hold the reset button for 10 seconds, then run the update again"),
    ("E512", "the delivery address could not be verified",
     "correct the address under Orders > Delivery details"),
    ("E513", "the ordered item is out of stock",
     "choose another color or wait for the restock email"),
    ("E620", "the account is locked after five failed sign-ins",
     "wait 30 minutes or reset the password"),
    ("E621", "the two-factor code has expired",
     "request a new code; each code is valid for 5 minutes"),
    ("E702", "the number transfer was rejected by the old carrier",
     "check the account number and transfer PIN from the old carrier and submit again"),
]

# name, steps
PROCEDURES = [
    ("reset your password", ["open the Nimbus app", "tap Forgot password",
                             "enter your email address",
                             "open the reset link within 30 minutes"]),
    ("activate a new SIM card", ["insert the SIM card", "open the Nimbus app",
                                 "tap Activate SIM", "scan the barcode on the SIM card holder"]),
    ("transfer your number to Nimbus", ["ask your old carrier for the transfer PIN",
                                        "choose Keep my number when you order",
                                        "enter the account number and transfer PIN",
                                        "wait up to 24 hours for the transfer"]),
    ("get a copy of an invoice", ["open the Nimbus app", "go to Billing > Invoices",
                                  "choose the month", "tap Download PDF"]),
    ("return an item", ["open the Nimbus app", "go to Orders", "choose the item",
                        "tap Return and print the label",
                        "drop the parcel off within 7 days"]),
    ("cancel an order", ["open the Nimbus app", "go to Orders", "choose the order",
                         "tap Cancel order before it ships"]),
    ("set up voicemail", ["dial 123 from your Nimbus phone", "choose a four-digit PIN",
                          "record your greeting"]),
    ("switch on roaming", ["open the Nimbus app", "go to Settings > Roaming",
                           "turn on the Roaming switch"]),
    ("change your plan", ["open the Nimbus app", "go to My plan", "tap Change plan",
                          "pick the new plan and confirm"]),
    ("update your payment card", ["open the Nimbus app", "go to Billing > Payment methods",
                                  "tap Add card", "set the new card as default"]),
]

# topic, fact sentence, question phrasings
POLICIES = [
    ("returns", "Unopened items can be returned within 30 days of delivery for a full refund.",
     ["How long do I have to return an item?", "What is the return window?",
      "Can I still return something I bought three weeks ago?"]),
    ("opened items",
     "Opened items can be returned within 14 days with a 10 percent restocking fee.",
     ["Can I return an opened item?", "Is there a fee for returning an opened device?"]),
    ("refunds", "Refunds go back to the original payment method within 5 business days.",
     ["How long does a refund take?", "When will I get my refund?",
      "Where does my refund go?"]),
    ("standard shipping", "Standard shipping takes 3 to 5 business days and is free over $50.",
     ["How long does standard shipping take?", "Is shipping free?"]),
    ("express shipping", "Express shipping arrives the next business day and costs $12.99.",
     ["How much is express shipping?", "Can I get my order tomorrow?"]),
    ("invoices", "Invoices are issued on the 1st of each month and stay in the app for 24 months.",
     ["When are invoices issued?", "How far back can I download invoices?"]),
    ("late fee", "A $5 late fee is added when a bill is unpaid 10 days after its due date.",
     ["Is there a late fee?", "What happens if I pay my bill late?"]),
    ("plan changes", "Upgrades start at once; downgrades start at the next billing cycle.",
     ["When does a plan change take effect?", "If I downgrade, when does it start?"]),
    ("number transfer", "A number transfer to Nimbus takes up to 24 hours.",
     ["How long does it take to transfer my number?", "When will my old number work?"]),
    ("support hours", "Chat support is open 24/7; phone support is open from 8 am to 10 pm.",
     ["When is support open?", "Can I call support at night?"]),
    ("warranty claims", "Warranty claims are made in the app under Orders > Warranty.",
     ["How do I make a warranty claim?", "Where do I file a warranty claim?"]),
]

FIRST_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo",
               "Kofi", "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq",
               "Uma", "Vik", "Wen", "Yara", "Zoe"]
COUNTRIES = ["Spain", "Japan", "Canada", "Brazil", "Kenya", "France", "Italy", "Mexico",
             "Germany", "India", "Egypt", "Norway"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def gb(n: int) -> str:
  return "unlimited data" if n == 0 else f"{n} GB of data"


def join_steps(steps: list[str]) -> str:
  return "; ".join(f"{i + 1}. {s}" for i, s in enumerate(steps)) + "."


def cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def plan_summary(p) -> str:
  name, price, data, minutes, roam, five_g, hotspot = p
  roaming = f"roaming in {roam} countries" if roam else "no roaming"
  net = "5G" if five_g else "4G"
  hs = f"{hotspot} GB of hotspot" if hotspot else "no hotspot"
  return (f"The {name} plan costs ${price} per month and includes {gb(data)}, {minutes}, "
          f"{hs} and {roaming} on the {net} network.")


def device_summary(d) -> str:
  name, kind, price, warranty, colors = d
  return (f"The {name} is a {kind} that costs ${price}, comes with a {warranty}-month "
          f"warranty and is sold in {', '.join(colors)}.")


def error_summary(e) -> str:
  code, meaning, fix = e
  return f"Error {code} means {meaning}. To fix it, {fix}."


# ----------------------------------------------------------------------------- corpus (text)

def corpus(rng: random.Random) -> list[dict]:
  docs: list[str] = []
  for p in PLANS:
    name, price, data, minutes, roam, five_g, hotspot = p
    docs += [
        f"Plan guide: {name}. {plan_summary(p)}",
        f"{COMPANY} plans explained. {name} is priced at ${price} a month. It gives you "
        f"{gb(data)} and {minutes}.",
        f"Agent note: customers on {name} get {hotspot} GB of hotspot data"
        f"{' and 5G' if five_g else ''}. Roaming: "
        f"{f'{roam} countries' if roam else 'not included'}.",
        f"Q: What does {name} include? A: {plan_summary(p)}",
        f"{name} at a glance: price ${price}/month; data {gb(data)}; calls {minutes}; "
        f"network {'5G' if five_g else '4G'}.",
    ]
  for a in PLANS:
    for b in PLANS:
      if a[1] < b[1]:
        docs.append(f"Comparing {a[0]} and {b[0]}: {a[0]} costs ${a[1]} with {gb(a[2])}, "
                    f"while {b[0]} costs ${b[1]} with {gb(b[2])}. The difference is "
                    f"${b[1] - a[1]} per month.")
  for d in DEVICES:
    name, kind, price, warranty, colors = d
    docs += [
        f"Product page: {name}. {device_summary(d)}",
        f"The {name} ({kind}) sells for ${price}. Warranty: {warranty} months.",
        f"Agent note: the {name} is available in {' and '.join(colors)}.",
        f"Q: How long is the warranty on the {name}? A: The {name} has a {warranty}-month "
        f"warranty.",
        f"Shop listing: {name}, ${price}, colors: {', '.join(colors)}.",
    ]
  for e in ERRORS:
    code, meaning, fix = e
    docs += [
        f"Troubleshooting {code}. {error_summary(e)}",
        f"Error code {code}: {meaning}. Fix: {fix}.",
        f"Q: What does error {code} mean? A: It means {meaning}.",
        f"Q: How do I fix error {code}? A: {cap(fix)}.",
        f"Agent note: when a customer reports {code}, explain that {meaning} and tell them "
        f"to {fix}.",
    ]
  for name, steps in PROCEDURES:
    docs += [
        f"How to {name}: {join_steps(steps)}",
        f"Help article. To {name}, {', then '.join(steps)}.",
        f"Q: How do I {name}? A: {join_steps(steps)}",
    ]
  for topic, fact, _ in POLICIES:
    docs += [f"Policy on {topic}: {fact}", f"{COMPANY} policy. {fact}",
             f"Agent note on {topic}: {fact}"]
  # Resolved tickets: the same facts in context, with varied slots.
  for _ in range(520):
    who = rng.choice(FIRST_NAMES)
    ticket = rng.randrange(10000, 99999)
    kind = rng.randrange(3)
    if kind == 0:
      code, meaning, fix = rng.choice(ERRORS)
      dev = rng.choice(DEVICES)[0]
      docs.append(f"Ticket {ticket}: {who} saw error {code} on a {dev}. The agent explained "
                  f"that {meaning} and asked {who} to {fix}. Resolved.")
    elif kind == 1:
      p = rng.choice(PLANS)
      want = rng.choice([5, 10, 20, 30, 50])
      fit = [q for q in PLANS if q[2] == 0 or q[2] >= want]
      best = min(fit, key=lambda q: q[1])
      docs.append(f"Ticket {ticket}: {who} is on {p[0]} and needs {want} GB a month. The "
                  f"cheapest plan with enough data is {best[0]} at ${best[1]}. Resolved.")
    else:
      name, steps = rng.choice(PROCEDURES)
      docs.append(f"Ticket {ticket}: {who} asked how to {name}. The agent said: "
                  f"{join_steps(steps)} Resolved.")
  rng.shuffle(docs)
  return [{"text": t} for t in docs]


# ----------------------------------------------------------------------------- instructions

def cheapest_plan(need_gb: int, roaming: bool) -> tuple:
  fit = [p for p in PLANS if (p[2] == 0 or p[2] >= need_gb) and (p[4] > 0 or not roaming)]
  return min(fit, key=lambda p: p[1])


def instructions(rng: random.Random) -> list[dict]:
  rows: list[tuple[str, str, str]] = []  # instruction, input, output

  def add(questions: Iterable[str], answer: str, inp: str = "") -> None:
    for q in questions:
      rows.append((q, inp, answer))

  for p in PLANS:
    name, price, data, minutes, roam, five_g, hotspot = p
    add([f"What does the {name} plan include?", f"Tell me about the {name} plan.",
         f"Describe {name}."], plan_summary(p))
    add([f"How much is {name}?", f"What is the monthly price of {name}?"],
        f"{name} costs ${price} per month.")
    add([f"How much data comes with {name}?", f"Data allowance of {name}?"],
        f"{name} includes {gb(data)}.")
    add([f"Does {name} include roaming?", f"Can I use {name} abroad?"],
        f"Yes, {name} includes roaming in {roam} countries." if roam
        else f"No, {name} does not include roaming.")
    add([f"Is {name} a 5G plan?"],
        f"Yes, {name} runs on the 5G network." if five_g else f"No, {name} is a 4G plan.")
  for a in PLANS:
    for b in PLANS:
      if a[1] < b[1]:
        add([f"What is the price difference between {a[0]} and {b[0]}?"],
            f"{b[0]} costs ${b[1] - a[1]} more per month than {a[0]} (${b[1]} vs ${a[1]}).")
  for need in (3, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80):
    for roaming in (False, True):
      p = cheapest_plan(need, roaming)
      extra = " and roaming" if roaming else ""
      add([f"Which is the cheapest plan with at least {need} GB of data{extra}?",
           f"I need {need} GB a month{extra}. Which plan should I take?"],
          f"The cheapest plan with at least {need} GB{extra} is {p[0]} at ${p[1]} per month.")
  for d in DEVICES:
    name, kind, price, warranty, colors = d
    add([f"What is the {name}?", f"Tell me about the {name}."], device_summary(d))
    add([f"How much does the {name} cost?", f"Price of the {name}?"],
        f"The {name} costs ${price}.")
    add([f"How long is the warranty on the {name}?"],
        f"The {name} has a {warranty}-month warranty.")
    add([f"Which colors does the {name} come in?"],
        f"The {name} comes in {', '.join(colors)}.")
  for e in ERRORS:
    code, meaning, fix = e
    add([f"What does error {code} mean?", f"My app shows {code}. What is that?"],
        f"Error {code} means {meaning}.")
    add([f"How do I fix error {code}?", f"I keep getting {code}. What should I do?"],
        f"{error_summary(e)}")
    for dev in rng.sample(DEVICES, 2):
      add([f"My {dev[0]} shows error {code}. Help!"], f"{error_summary(e)}")
  for name, steps in PROCEDURES:
    add([f"How do I {name}?", f"What are the steps to {name}?", f"Explain how to {name}."],
        f"To {name}: {join_steps(steps)}")
  for _, fact, questions in POLICIES:
    add(questions, fact)
  # Tasks with an input: summarize a ticket, extract the error code.
  for _ in range(150):
    who = rng.choice(FIRST_NAMES)
    code, meaning, fix = rng.choice(ERRORS)
    dev = rng.choice(DEVICES)[0]
    ticket = (f"{who} writes: my {dev} shows {code} since this morning and I cannot use it. "
              f"Please help.")
    if rng.random() < 0.5:
      add(["Summarize the support ticket in one sentence."],
          f"{who}'s {dev} shows error {code}, which means {meaning}.", ticket)
    else:
      add(["Reply to the customer with the fix."],
          f"Hi {who}, error {code} means {meaning}. Please {fix}.", ticket)
  rng.shuffle(rows)
  return [{"instruction": q, "input": i, "output": a} for q, i, a in rows]


# ----------------------------------------------------------------------------- intents

# domain -> intent -> clauses. Each clause names exactly one intent; {slots}
# are filled from the fact tables, so the wording varies but the label does not.
INTENTS: dict[str, dict[str, list[str]]] = {
    "billing": {
        "refund": ["I want a refund for the {device}", "please refund my last payment",
                   "can I get my money back for the {device}", "refund the ${amount} please"],
        "invoice_copy": ["send me a copy of my {month} invoice",
                         "I need the invoice for {month}", "where can I download my bill",
                         "I lost my {month} bill"],
        "payment_failed": ["my card payment keeps failing", "I get error E305 when I pay",
                           "the payment was declined", "my card was rejected"],
        "dispute_charge": ["there is a charge of ${amount} I do not recognize",
                           "I was charged twice this month",
                           "why was I billed ${amount} extra", "this charge is wrong"],
    },
    "account": {
        "reset_password": ["I forgot my password", "I need to reset my password",
                           "my password does not work anymore",
                           "how do I change my password"],
        "update_address": ["I moved and need to update my address",
                           "please change my address to {city}",
                           "my home address is out of date"],
        "change_plan": ["I want to switch to {plan}", "move me to the {plan} plan",
                        "can I upgrade to {plan}", "I would like to downgrade to {plan}"],
        "close_account": ["I want to close my account", "please cancel my contract",
                          "I am leaving Nimbus", "delete my account"],
    },
    "technical": {
        "no_signal": ["my {device} has no signal", "I have no service at home",
                      "calls keep dropping in {city}", "there is no network on my phone"],
        "slow_data": ["mobile data is very slow", "the internet on my {device} is crawling",
                      "pages take ages to load", "my 5G speed is terrible"],
        "activate_sim": ["my new SIM card does not work", "I need to activate my SIM",
                         "the SIM shows E101", "how do I activate the SIM card"],
        "roaming": ["roaming does not work in {country}",
                    "I cannot use data in {country}", "my phone shows E204 abroad",
                    "I am travelling to {country} and need roaming"],
    },
    "orders": {
        "track_order": ["where is my order {order}", "my {device} has not arrived yet",
                        "can you track order {order}", "when will my {device} be delivered"],
        "cancel_order": ["please cancel order {order}", "I do not want the {device} anymore",
                         "cancel my order before it ships", "stop the order for the {device}"],
        "return_item": ["I want to return the {device}", "how do I send back the {device}",
                        "the {device} is broken and I want to return it",
                        "I need a return label"],
        "change_delivery": ["deliver order {order} to {city} instead",
                            "can I change the delivery date",
                            "please ship the {device} to my office",
                            "I will not be home for the delivery"],
    },
}
OPENERS = ["", "Hi, ", "Hello, ", "Good morning, ", "Hey, "]
JOINERS = [" and ", ". Also, ", ", and also ", ". Besides that, "]
CLOSERS = ["", " Thanks.", " Thank you!", " Cheers."]
URGENT = [" This is urgent!", " Please help ASAP.", " I need this fixed today!"]
CITIES = ["Lisbon", "Osaka", "Toronto", "Nairobi", "Lyon", "Milan", "Denver", "Oslo"]


def utterance(rng: random.Random) -> tuple[str, dict]:
  domain = rng.choice(sorted(INTENTS))
  names = sorted(INTENTS[domain])
  chosen = rng.sample(names, 2 if rng.random() < 0.45 else 1)
  slots = dict(device=rng.choice(DEVICES)[0], plan=rng.choice(PLANS)[0],
               month=rng.choice(MONTHS), amount=rng.choice([12, 25, 40, 55, 79, 120]),
               city=rng.choice(CITIES), country=rng.choice(COUNTRIES),
               order=f"#{rng.randrange(100000, 999999)}")
  clauses = [rng.choice(INTENTS[domain][i]).format(**slots) for i in chosen]
  text = clauses[0]
  if len(clauses) == 2:
    text += rng.choice(JOINERS) + clauses[1]
  urgent = rng.random() < 0.3
  opener = rng.choice(OPENERS)
  text = opener + (text if opener else cap(text)) + "."
  text += rng.choice(URGENT) if urgent else rng.choice(CLOSERS)
  label = {"domain": domain, "intents": chosen, "priority": "high" if urgent else "normal"}
  return text, label


def intents(rng: random.Random) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
  """(train, test) utterances, unique texts, test disjoint from train."""
  seen: set[str] = set()
  examples = []
  while len(examples) < N_INTENT_TRAIN + N_INTENT_TEST:
    text, label = utterance(rng)
    if text not in seen:
      seen.add(text)
      examples.append((text, label))
  return examples[N_INTENT_TEST:], examples[:N_INTENT_TEST]


def intent_rows(examples) -> list[dict]:
  # The answer keeps the key order domain, intents, priority (coarse to fine);
  # the row itself is written with sorted keys like every other file.
  return [{"messages": [{"role": "user", "content": text},
                        {"role": "assistant", "content": json.dumps(label)}]}
          for text, label in examples]


def intent_cls_rows(examples) -> list[dict]:
  # Intent names are unique across domains, so the intents alone determine
  # the domain; sorted, since a set of labels has no order.
  return [{"text": text, "labels": sorted(label["intents"])} for text, label in examples]


# ----------------------------------------------------------------------------- general

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
            ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"), ("Norway", "Oslo"),
            ("Brazil", "Brasilia"), ("India", "New Delhi"), ("Mexico", "Mexico City"),
            ("Germany", "Berlin")]
WORDS = ["router", "signal", "planet", "garden", "window", "silver", "orange", "rocket",
         "pencil", "butter", "cloud", "river", "mobile", "number", "invoice", "tablet", "summer",
         "yellow", "bridge", "castle"]


def general(rng: random.Random) -> list[dict]:
  rows: list[tuple[str, str]] = []
  for _ in range(200):
    a, b = rng.randrange(1, 100), rng.randrange(1, 100)
    op = rng.choice("+-")
    value = a + b if op == "+" else a - b
    rows.append((rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}."]),
                 f"{a} {op} {b} = {value}."))
  for _ in range(60):
    a, b = rng.randrange(2, 13), rng.randrange(2, 13)
    rows.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
  for w in WORDS:
    rows.append((f"Reverse the word '{w}'.", w[::-1]))
    rows.append((f"Spell '{w}' backwards.", w[::-1]))
    rows.append((f"Write '{w}' in capital letters.", w.upper()))
    rows.append((f"How many letters are in '{w}'?", f"'{w}' has {len(w)} letters."))
  for country, city in CAPITALS:
    rows.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    rows.append((f"Which city is the capital of {country}?", f"{city}."))
  for _ in range(80):
    xs = rng.sample(range(1, 50), rng.randrange(3, 6))
    rows.append((f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}.",
                 ", ".join(map(str, sorted(xs)))))
  days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
  for i, d in enumerate(days):
    rows.append((f"What day comes after {d}?", f"{days[(i + 1) % 7]} comes after {d}."))
  rng.shuffle(rows)
  return [{"instruction": q, "input": "", "output": a} for q, a in rows]


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], out: pathlib.Path) -> None:
  """Byte-level BPE on ``texts`` saved as a transformers tokenizer (module doc)."""
  import transformers  # noqa: PLC0415  (heavy; only this step needs it)
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=512)
  fast.chat_template = CHATML_TEMPLATE
  fast.save_pretrained(str(out))


def tokenizer_texts(files: dict[str, list[dict]]) -> list[str]:
  """Every string the model will see, in a fixed order."""
  texts = list(SYSTEM_PROMPTS.values()) + ["system", "user", "assistant"]
  for name in sorted(files):
    for row in files[name]:
      texts += _strings(row)
  return texts


def _strings(value) -> list[str]:
  if isinstance(value, str):
    return [value] if value else []
  if isinstance(value, dict):
    return [s for k in sorted(value) for s in _strings(value[k])]
  if isinstance(value, list):
    return [s for v in value for s in _strings(v)]
  return []


# ----------------------------------------------------------------------------- main

def generate() -> dict[str, list[dict]]:
  """file name -> rows, each file from its own seeded stream so editing one
  generator leaves the others' rows unchanged."""
  def stream(name: str) -> random.Random:
    return random.Random(f"{SEED}:{name}")  # a str seed is hashed with SHA-512: stable

  train, test = intents(stream("intent"))
  return {
      "corpus.jsonl": corpus(stream("corpus")),
      "instructions.jsonl": instructions(stream("instructions")),
      "intent_train.jsonl": intent_rows(train),
      "intent_test.jsonl": intent_rows(test),
      "intent_cls_train.jsonl": intent_cls_rows(train),
      "intent_cls_test.jsonl": intent_cls_rows(test),
      "general.jsonl": general(stream("general")),
  }


def write(out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  files = generate()
  for name, rows in files.items():
    with open(out / name, "w", encoding="utf-8", newline="\n") as f:
      for row in rows:
        f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
  train_tokenizer(tokenizer_texts(files), out / "tokenizer")


def main() -> None:
  default = pathlib.Path(__file__).resolve().parents[1] / "data" / "demo"
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=default,
                      help=f"output directory (default: {default})")
  args = parser.parse_args()
  write(args.out)
  for path in sorted(args.out.rglob("*")):
    if path.is_file():
      print(f"{path.stat().st_size:>9,d}  {path}")


if __name__ == "__main__":
  main()
