"""forgesyte-example-text: an example ForgeSyte plugin, packaged.

The plugin class is :class:`forgesyte_example_text.plugin.Plugin`; the host
finds it through the ``forgesyte.plugins`` entry point (``text-stats``) when
the package is installed, or through ``manifest.json``'s ``entrypoint``
when the project directory is served as a plugin directory.
"""

__version__ = "0.1.0"
