"""text-stats: an example ForgeSyte plugin, packaged the ForgeSyte way.

What it shows:

- ForgeSyte's ``BasePlugin`` shape: ``name``; ``tools``, a dict of tool name
  -> ``{handler, description, input_schema, output_schema}``;
  ``run_tool(tool_name, args)``; the ``validate()``, ``on_load()`` and
  ``on_unload()`` hooks (the host calls the first two after constructing
  the plugin and the last one when it stops it).
- The import fallback of ForgeSyte's published plugins: ``BasePlugin`` comes
  from the ForgeSyte server (``app.plugins.base``) when that is importable
  and from a local stand-in otherwise, as under the ForgeSyte host, which
  needs nothing but the standard library.
- Handlers given both ways: by method name (``"handler": "count"``) and as
  callables (``"handler": self.top_words``).
- Results of two kinds: a plain dict (``count``) and a dataclass
  (``top_words``), which the host's runner turns into a JSON object.
- Packaging: an entry point in the ``forgesyte.plugins`` group and a
  ``manifest.json`` shipped beside this module (see ``pyproject.toml``).

Tools:

- ``count`` ``{"text": str}`` -> ``{"words", "lines", "chars"}``
- ``top_words`` ``{"text": str, "n": int = 10}`` ->
  ``{"words": [[word, count], ...], "total_words", "distinct_words"}``

Words are runs of letters, digits and underscores, with inner apostrophes
kept (``don't``); ``top_words`` compares them case-insensitively and orders
them by count, then alphabetically.
"""

import dataclasses
import logging
import re
from collections import Counter
from typing import Any, Dict, Iterator, List, Tuple

from . import __version__

try:
    from app.plugins.base import BasePlugin
except ImportError:

    class BasePlugin:  # type: ignore[no-redef]
        """Local stand-in for ForgeSyte's ``app.plugins.base.BasePlugin``,
        used where the ForgeSyte server package is not installed."""

        name: str = ""
        tools: Dict[str, Dict[str, Any]] = {}

        def run_tool(self, tool_name: str, args: Dict[str, Any]) -> Any:
            raise NotImplementedError

        def validate(self) -> None:
            """Optional start-up checks."""

        def on_load(self) -> None:
            """Optional: called once the plugin is constructed and valid."""

        def on_unload(self) -> None:
            """Optional: called when the host stops the plugin."""


logger = logging.getLogger(__name__)

WORD_RE = re.compile(r"\w+(?:['\u2019]\w+)*")
MAX_TOP_WORDS = 1000

# The longest text a call takes (a tool error beyond): the plugin's memory
# grows with the words of a text (`top_words` counts each distinct one),
# and its runner has 512 MiB by default.
MAX_TEXT_CHARS = 1024 * 1024

_TEXT = {"type": "string", "description": "The text to analyse",
         "maxLength": MAX_TEXT_CHARS}


@dataclasses.dataclass
class TopWords:
    """The result of ``top_words``: the runner converts it to a JSON object
    (the tuples in ``words`` become two-element arrays)."""

    words: List[Tuple[str, int]]
    total_words: int
    distinct_words: int


def words_of(text: str) -> Iterator[str]:
    """The words of ``text``, one at a time (no list of them all)."""
    return (m.group() for m in WORD_RE.finditer(text))


class Plugin(BasePlugin):
    """Text statistics, in ForgeSyte's BasePlugin shape."""

    name = "text-stats"
    version = __version__

    def __init__(self) -> None:
        # BasePlugin.__init__ is not called: the server's version insists on
        # callable handlers, and this table also names methods by string
        # (as ForgeSyte's published plugins do). validate() checks it.
        self.loaded = False
        self.calls = 0
        self.tools: Dict[str, Dict[str, Any]] = {
            "count": {
                "handler": "count",  # a method name
                "description": "Number of words, lines and characters of a text.",
                "input_schema": {
                    "type": "object",
                    "properties": {"text": _TEXT},
                    "required": ["text"],
                    "additionalProperties": False,
                },
                "output_schema": {
                    "type": "object",
                    "properties": {
                        "words": {"type": "integer"},
                        "lines": {"type": "integer"},
                        "chars": {"type": "integer"},
                    },
                },
            },
            "top_words": {
                "handler": self.top_words,  # a callable
                "description": "The n most frequent words of a text (case-insensitive), with their counts.",
                "input_schema": {
                    "type": "object",
                    "properties": {
                        "text": _TEXT,
                        "n": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_WORDS, "default": 10},
                    },
                    "required": ["text"],
                    "additionalProperties": False,
                },
                "output_schema": {
                    "type": "object",
                    "properties": {
                        "words": {
                            "type": "array",
                            "items": {
                                "type": "array",
                                "prefixItems": [{"type": "string"}, {"type": "integer"}],
                            },
                        },
                        "total_words": {"type": "integer"},
                        "distinct_words": {"type": "integer"},
                    },
                },
            },
        }

    # -- the BasePlugin contract --------------------------------------------

    def run_tool(self, tool_name: str, args: Dict[str, Any]) -> Any:
        """Checks ``args`` against the tool's input schema, then calls its
        handler with them as keyword arguments."""
        spec = self.tools.get(tool_name)
        if spec is None:
            raise ValueError("Unknown tool: %s (tools: %s)" % (tool_name, ", ".join(sorted(self.tools))))
        check_args(tool_name, spec["input_schema"], args)
        self.calls += 1
        return self._handler(spec)(**args)

    def validate(self) -> None:
        """Every tool has a resolvable handler and the metadata the host
        lists."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("%s must define a string `name`" % type(self).__name__)
        for tool_name, spec in self.tools.items():
            self._handler(spec, tool_name)
            if not isinstance(spec.get("description"), str):
                raise ValueError("Tool '%s' must define a string 'description'" % tool_name)
            for key in ("input_schema", "output_schema"):
                if not isinstance(spec.get(key), dict):
                    raise ValueError("Tool '%s' must define a dict '%s'" % (tool_name, key))

    def on_load(self) -> None:
        self.loaded = True
        logger.info("text-stats %s loaded: tools %s", self.version, ", ".join(self.tools))

    def on_unload(self) -> None:
        logger.info("text-stats unloaded after %d calls", self.calls)

    def _handler(self, spec: Dict[str, Any], tool_name: str = "?") -> Any:
        """The tool's handler as a callable: a method name is looked up on
        the plugin."""
        handler = spec.get("handler")
        if isinstance(handler, str):
            handler = getattr(self, handler, None)
        if not callable(handler):
            raise ValueError("Tool '%s' must define a callable 'handler' or a method name" % tool_name)
        return handler

    # -- tools ----------------------------------------------------------------

    def count(self, text: str) -> Dict[str, int]:
        return {
            "words": sum(1 for _ in words_of(text)),
            "lines": len(text.splitlines()),
            "chars": len(text),
        }

    def top_words(self, text: str, n: int = 10) -> TopWords:
        counts = Counter(word.lower() for word in words_of(text))
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return TopWords(
            words=ranked[:n],
            total_words=sum(counts.values()),
            distinct_words=len(counts),
        )


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
               "object": dict, "array": list}


def check_args(tool_name: str, schema: Dict[str, Any], args: Any) -> None:
    """A small check of ``args`` against the top level of an object schema
    (types, required, unknown names, integer bounds); a failure is a
    ``ValueError`` naming the argument, which the host reports as a tool
    error (HTTP 422)."""
    if not isinstance(args, dict):
        raise ValueError("%s: the arguments must be an object" % tool_name)
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in args:
            raise ValueError("%s: missing required argument '%s'" % (tool_name, name))
    for name, value in args.items():
        prop = props.get(name)
        if prop is None:
            if schema.get("additionalProperties") is False:
                raise ValueError("%s: unknown argument '%s' (expected: %s)"
                                 % (tool_name, name, ", ".join(sorted(props))))
            continue
        kind = prop.get("type")
        expected = _JSON_TYPES.get(kind)
        # JSON booleans are not numbers, though Python's bool is an int.
        if expected and (not isinstance(value, expected) or (isinstance(value, bool) and kind != "boolean")):
            raise ValueError("%s: argument '%s' must be of type %s, not %s"
                             % (tool_name, name, kind, type(value).__name__))
        if "maxLength" in prop and len(value) > prop["maxLength"]:
            raise ValueError("%s: argument '%s' is %d characters long, over the limit of %d"
                             % (tool_name, name, len(value), prop["maxLength"]))
        if "minimum" in prop and value < prop["minimum"]:
            raise ValueError("%s: argument '%s' must be at least %s" % (tool_name, name, prop["minimum"]))
        if "maximum" in prop and value > prop["maximum"]:
            raise ValueError("%s: argument '%s' must be at most %s" % (tool_name, name, prop["maximum"]))
