"""Tests of the packaged text-stats example plugin (standard library only).

Run from this directory: ``python3 -m unittest``. The package is imported
from this directory, as the ForgeSyte host does when it serves the
directory as a plugin directory; the ForgeSyte server package (``app``) is
not installed, so the plugin's local BasePlugin stand-in is in use.
"""

import dataclasses
import importlib.util
import json
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from forgesyte_example_text import __version__, plugin  # noqa: E402
from forgesyte_example_text.plugin import Plugin, TopWords  # noqa: E402

TEXT = "The cat sat.\nThe cat ran!\n\nDon't stop: the END"


class FallbackTests(unittest.TestCase):
    def test_server_base_plugin_is_absent(self):
        self.assertIsNone(importlib.util.find_spec("app"))

    def test_local_base_plugin_is_used(self):
        base = plugin.BasePlugin
        self.assertEqual(base.__module__, "forgesyte_example_text.plugin")
        self.assertTrue(issubclass(Plugin, base))
        for hook in ("run_tool", "validate", "on_load", "on_unload"):
            self.assertTrue(callable(getattr(base, hook)), hook)


class ContractTests(unittest.TestCase):
    def setUp(self):
        self.plugin = Plugin()

    def test_shape(self):
        self.assertEqual(self.plugin.name, "text-stats")
        self.assertEqual(self.plugin.version, __version__)
        self.assertEqual(sorted(self.plugin.tools), ["count", "top_words"])
        for spec in self.plugin.tools.values():
            self.assertEqual(
                sorted(spec), ["description", "handler", "input_schema", "output_schema"])

    def test_handlers_are_mixed(self):
        self.assertEqual(self.plugin.tools["count"]["handler"], "count")
        self.assertTrue(callable(self.plugin.tools["top_words"]["handler"]))

    def test_lifecycle(self):
        self.plugin.validate()
        self.assertFalse(self.plugin.loaded)
        self.plugin.on_load()
        self.assertTrue(self.plugin.loaded)
        self.plugin.on_unload()

    def test_validate_rejects_a_missing_handler(self):
        self.plugin.tools["count"]["handler"] = "no_such_method"
        with self.assertRaisesRegex(ValueError, "Tool 'count' must define a callable"):
            self.plugin.validate()

    def test_manifests(self):
        with open(os.path.join(HERE, "manifest.json")) as f:
            outer = json.load(f)
        with open(os.path.join(HERE, "forgesyte_example_text", "manifest.json")) as f:
            inner = json.load(f)
        self.assertEqual(outer, inner)
        self.assertEqual(outer["name"], self.plugin.name)
        self.assertEqual(outer["version"], __version__)
        self.assertEqual(outer["runtime"], "python")
        self.assertEqual(outer["entrypoint"], "forgesyte_example_text.plugin:Plugin")


class ToolTests(unittest.TestCase):
    def setUp(self):
        self.plugin = Plugin()

    def test_count(self):
        out = self.plugin.run_tool("count", {"text": TEXT})
        self.assertEqual(out, {"words": 10, "lines": 4, "chars": len(TEXT)})

    def test_count_empty(self):
        self.assertEqual(self.plugin.run_tool("count", {"text": ""}),
                         {"words": 0, "lines": 0, "chars": 0})

    def test_count_unicode(self):
        out = self.plugin.run_tool("count", {"text": "naïve café\r\nßtraße"})
        self.assertEqual(out, {"words": 3, "lines": 2, "chars": 18})

    def test_top_words_is_a_dataclass(self):
        out = self.plugin.run_tool("top_words", {"text": TEXT, "n": 3})
        self.assertIsInstance(out, TopWords)
        self.assertEqual(out.words, [("the", 3), ("cat", 2), ("don't", 1)])
        self.assertEqual(out.total_words, 10)
        self.assertEqual(out.distinct_words, 7)
        # What the host's runner sends: dataclasses.asdict, tuples as arrays.
        self.assertEqual(
            json.loads(json.dumps(dataclasses.asdict(out))),
            {"words": [["the", 3], ["cat", 2], ["don't", 1]],
             "total_words": 10, "distinct_words": 7})

    def test_top_words_default_n(self):
        text = " ".join("w%d" % i for i in range(30))
        out = self.plugin.run_tool("top_words", {"text": text})
        self.assertEqual(len(out.words), 10)
        self.assertEqual(out.words[0], ("w0", 1))

    def test_bad_arguments(self):
        cases = [
            ("count", {}, "missing required argument 'text'"),
            ("count", {"text": 3}, "'text' must be of type string"),
            ("count", {"text": "a", "lang": "en"}, "unknown argument 'lang'"),
            ("top_words", {"text": "a", "n": "3"}, "'n' must be of type integer"),
            ("top_words", {"text": "a", "n": True}, "'n' must be of type integer"),
            ("top_words", {"text": "a", "n": 0}, "'n' must be at least 1"),
            ("count", {"text": "a" * (1024 * 1024 + 1)}, "over the limit of 1048576"),
            ("nope", {}, "Unknown tool: nope"),
        ]
        for tool, args, message in cases:
            with self.subTest(tool=tool, args=args):
                with self.assertRaises(ValueError) as cm:
                    self.plugin.run_tool(tool, args)
                self.assertIn(message, str(cm.exception))


if __name__ == "__main__":
    unittest.main()
