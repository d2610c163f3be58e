"""Reference server of forgesyte-bench's python_http figure, written into its work dir.

Shaped like ForgeSyte's Python original (``server/app/api.py``): FastAPI on
uvicorn, one worker, every plugin constructed once in this process, and a
tool call is ``plugin.run_tool(tool, args)`` called directly inside the
``async def`` route. Plugins are loaded from ``plugin.py`` with importlib,
as the seed does. The answer has the host's shape:
``{"ok", "plugin_id", "tool_name", "result", "processing_time_ms"}``.

Usage: python reference_server.py --plugins DIR [--bind HOST:PORT]

It binds the socket itself (port 0: an ephemeral one), prints
``reference listening on http://HOST:PORT`` on stdout, then serves with
``uvicorn.Server`` (log level warning, no access log).
"""

import argparse
import importlib.util
import json
import os
import socket
import sys
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def load_plugins(root):
    plugins = {}
    for entry in sorted(os.listdir(root)):
        directory = os.path.join(root, entry)
        path = os.path.join(directory, "plugin.py")
        if not os.path.isfile(path):
            continue
        name = entry
        manifest = os.path.join(directory, "manifest.json")
        if os.path.isfile(manifest):
            with open(manifest, encoding="utf-8") as f:
                name = json.load(f).get("name", entry)
        module_name = "plugin_" + entry.replace("-", "_")
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        plugins[name] = module.Plugin()
    return plugins


def make_app(plugins):
    app = FastAPI()

    @app.post("/v1/plugins/{name}/tools/{tool}/run")
    async def run_tool(name: str, tool: str, request: Request):
        plugin = plugins.get(name)
        if plugin is None:
            return JSONResponse(
                status_code=404,
                content={
                    "ok": False,
                    "plugin_id": name,
                    "tool_name": tool,
                    "error": "Plugin '%s' not found" % name,
                    "error_type": "PluginNotFound",
                },
            )
        body = await request.json()
        args = body.get("args", {}) if isinstance(body, dict) else {}
        started = time.perf_counter()
        try:
            result = plugin.run_tool(tool, args)
        except Exception as e:
            return JSONResponse(
                status_code=422,
                content={
                    "ok": False,
                    "plugin_id": name,
                    "tool_name": tool,
                    "error": str(e),
                    "error_type": type(e).__name__,
                    "detail": str(e),
                },
            )
        return {
            "ok": True,
            "plugin_id": name,
            "tool_name": tool,
            "result": result,
            "processing_time_ms": (time.perf_counter() - started) * 1000.0,
        }

    return app


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plugins", required=True)
    parser.add_argument("--bind", default="127.0.0.1:0")
    options = parser.parse_args()
    host, _, port = options.bind.rpartition(":")
    app = make_app(load_plugins(options.plugins))
    # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off only on
    # sockets whose protocol is IPPROTO_TCP, and uvicorn writes headers and
    # body apart, so with 0 every answer's body waited for the client's
    # delayed ACK (about 40 ms a request), which no real deployment does.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host or "127.0.0.1", int(port or 0)))
    sock.listen(2048)
    config = uvicorn.Config(app, workers=1, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    print("reference listening on http://%s:%d" % sock.getsockname()[:2], flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
