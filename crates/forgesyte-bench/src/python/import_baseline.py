"""Baseline of forgesyte-bench's python_startup figure, written into its work dir.

One interpreter imports every ``plugin.py`` one level under DIR with
importlib (``spec_from_file_location``, as the seed's plugin manager does)
and constructs its ``Plugin()``, in sorted order, then prints one JSON line.
The benchmark times this whole process, interpreter start-up included.

Usage: python3 import_baseline.py DIR
"""

import importlib.util
import json
import os
import sys


def main(root):
    names = sorted(
        entry
        for entry in os.listdir(root)
        if os.path.isfile(os.path.join(root, entry, "plugin.py"))
    )
    constructed = 0
    for entry in names:
        path = os.path.join(root, entry, "plugin.py")
        module_name = "plugin_" + entry.replace("-", "_")
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        instance = module.Plugin()
        if "noop" in instance.tools:
            constructed += 1
    print(json.dumps({"plugins": len(names), "constructed": constructed}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: import_baseline.py DIR")
    main(sys.argv[1])
