"""Data: files → canonical conversations → tokens with answer-only loss masks.

``formats`` converts rows (alpaca, sharegpt, messages, text, pairwise, label)
to ``Conversation``s; ``sources`` reads files, globs, saved datasets and hub
names; ``templates`` renders conversations into ``Encoded`` token ids and loss
masks, with truncation and drop counts.
"""
from jaxsft.data.formats import Conversation, Message, label_answer, to_conversation
from jaxsft.data.sources import iter_examples, load_examples
from jaxsft.data.templates import (BUILTINS, Counts, Encoded, RoleTagTemplate, Template,
                                   TokenizerTemplate, encode, get_template)

__all__ = ["BUILTINS", "Conversation", "Counts", "Encoded", "Message", "RoleTagTemplate",
           "Template", "TokenizerTemplate", "encode", "get_template", "iter_examples",
           "label_answer", "load_examples", "to_conversation"]
