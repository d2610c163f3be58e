"""A ForgeSyte benchmark plugin, written by forgesyte-bench into its work dir.

The seed's layout: ``class Plugin`` in ``plugin.py``, constructed as
``Plugin()``, with a ``tools`` dict and ``run_tool(tool_name, args)``. Its
tools, ``noop`` and ``noop_frame`` (one binary argument, ``frame``, which
arrives as ``bytes``; it answers its length), return at once: what a call
costs is the host's path to the plugin and back, nothing else.
``noop_frame_view`` is ``noop_frame`` opting in to ``"zero_copy": True``
(a large ``frame`` arrives as a read-only ``memoryview``).
"""


class Plugin:
    def __init__(self):
        obj = {"type": "object"}
        self.tools = {
            "noop": {
                "handler": self.noop,
                "description": "Does nothing and returns {}.",
                "input_schema": obj,
                "output_schema": obj,
            },
            "noop_frame": {
                "handler": self.noop_frame,
                "description": "Takes one binary argument, frame; returns {}.",
                "input_schema": {
                    "type": "object",
                    "properties": {"frame": {"type": "string", "format": "binary"}},
                    "required": ["frame"],
                },
                "output_schema": obj,
            },
        }
        view = dict(self.tools["noop_frame"], zero_copy=True)
        view["description"] = "noop_frame with a zero-copy memoryview."
        self.tools["noop_frame_view"] = view

    def run_tool(self, tool_name, args):
        if tool_name not in self.tools:
            raise ValueError("Unknown tool: %s" % tool_name)
        return self.tools[tool_name]["handler"](args)

    def noop(self, args):
        return {}

    def noop_frame(self, args):
        return {"len": len(args["frame"])}
