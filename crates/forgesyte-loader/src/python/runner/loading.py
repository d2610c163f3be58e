"""The plugin's code: importing it (the seed's ``plugin.py`` or an
installed package's module; a plugin's own modules from their sources
only, never from bytecode), and finding its class."""

import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys

from . import base
from .base import diag, out_of_memory_unless_raised
from .errors import clean, clean_capped, python_error, wire_error


# Compiled at import, so once in the zygote: each forked runner compiled it
# again (``re``'s cache is the zygote's, which never held it), 20-45 µs of
# every start.
_NOT_WORD = re.compile(r"\W")


def _sanitize(name):
    return _NOT_WORD.sub("_", name) or "plugin"


class _Checked(object):
    """A signed or pinned plugin's checked files (``--sources-fd``: path
    relative to ``root`` -> SHA-256): the bytes a module of the tree is
    loaded from must be those the host checked, whenever it is imported
    (the host checks the files once, before the runner starts; a module
    imported later, or swapped while the runner imported it, is checked
    here, on the bytes Python runs)."""

    def __init__(self, root, sources):
        self.root = root
        self.real_root = os.path.realpath(root)
        self.sources = sources

    def under(self, path):
        """Whether ``path`` is in the tree: by its name, or where it
        resolves (a plugin that puts ``os.path.realpath(__file__)``'s
        directory on ``sys.path`` imports its modules by their resolved
        names when the plugins directory is reached through a link)."""
        return (os.path.abspath(path).startswith(self.root + os.sep)
                or os.path.realpath(path).startswith(self.real_root + os.sep))

    def _rel(self, path):
        where = os.path.abspath(path)
        if where.startswith(self.root + os.sep):
            return os.path.relpath(where, self.root).replace(os.sep, "/")
        return os.path.relpath(os.path.realpath(path), self.real_root).replace(os.sep, "/")

    def check(self, path, data):
        """Raises ImportError unless ``data``, read from ``path``, are the
        checked bytes of that file."""
        import hashlib

        self._compare(path, hashlib.sha256(data).hexdigest())

    def check_file(self, f, path):
        """:meth:`check` of the open file ``f`` (read from its start, a
        MiB at a time: an extension module may be large)."""
        import hashlib

        digest = hashlib.sha256()
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        self._compare(path, digest.hexdigest())

    def _compare(self, path, now):
        rel = self._rel(path)
        expected = self.sources.get(rel)
        if expected is None:
            venv = _virtual_environment_of(self.root, rel)
            if venv is not None:
                raise ImportError(
                    "%s is in the virtual environment %s inside the plugin's directory, which its "
                    "signature or pin does not cover (no file of a directory holding pyvenv.cfg is "
                    "listed), so no code there is imported: give a signed or pinned plugin an "
                    "interpreter outside its directory (--python, or an absolute \"python\" in "
                    "its manifest)" % (rel, venv), path=path)
            if not _listable(rel):
                raise ImportError(
                    "%s is not among the plugin's checked files: a signature or pin covers "
                    "only *.py files and extension modules, never hidden entries (.name) or "
                    "__pycache__, so no code there is imported" % rel, path=path)
            raise ImportError(
                "%s is not among the plugin's checked files: it appeared after the plugin's "
                "signature or pin was checked, and is not imported" % rel, path=path)
        if now != expected:
            raise ImportError(
                "%s changed since the plugin's signature or pin was checked (sha256 now %s, "
                "checked %s): it is not imported" % (rel, now, expected), path=path)


# What a signature or pin lists (``integrity::loadable_files``): ``*.py``,
# ``*.so`` and ``*.so.N[.M...]`` files outside hidden entries and
# ``__pycache__``.
_LISTED_NAME = re.compile(r"(?:.*\.py|.*\.so(?:\.[0-9]+)*)\Z", re.S)


def _listable(rel):
    """Whether a file at ``rel`` (relative, ``/``-separated) is of a kind
    a signature or pin lists."""
    parts = rel.split("/")
    return (not any(p.startswith(".") or p == "__pycache__" for p in parts)
            and _LISTED_NAME.match(parts[-1]) is not None)


def _virtual_environment_of(root, rel):
    """The directory (relative, ``/``-separated) of the virtual environment
    holding file ``rel`` of the tree at ``root``: the nearest parent that
    holds ``pyvenv.cfg`` and is no package (no ``__init__.py``), as a
    listing skips it (``integrity.rs``); None when there is none."""
    parts = rel.split("/")[:-1]
    for end in range(1, len(parts) + 1):
        where = os.path.join(root, *parts[:end])
        if (os.path.isfile(os.path.join(where, "pyvenv.cfg"))
                and not os.path.exists(os.path.join(where, "__init__.py"))):
            return "/".join(parts[:end])
    return None


class _SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    """Loads a module of the plugin's directory from its source: never from
    bytecode in ``__pycache__``, which signatures and integrity pins do not
    cover and which Python runs in the source's place when its header
    matches the source's time and size; and writes none there. With
    ``checked`` (a :class:`_Checked`), the source's bytes must be the
    checked ones."""

    def __init__(self, fullname, path, checked=None):
        super().__init__(fullname, path)
        self.checked = checked

    def path_stats(self, path):
        # ``SourceLoader.get_code`` reads (and later writes) bytecode only
        # when it knows the source's time.
        raise OSError("a plugin's bytecode is never read")

    def get_data(self, path):
        data = super().get_data(path)
        # Its module's source only: a data file read through the loader
        # (``pkgutil.get_data``, ``importlib.resources``) is no code, and
        # need not be among the checked files, as for an unchecked plugin.
        if self.checked is not None and path == self.path:
            self.checked.check(path, data)
        return data


def _bytecode_refused(name, path):
    """The ImportError of module ``name``, bytecode at ``path`` (in a
    plugin's tree) without its source."""
    return ImportError(
        "%s is bytecode without its source (%s): a plugin's bytecode never runs, "
        "since pins and signatures cover sources only" % (name, clean(path)),
        name=name, path=path)


class _SourceOnlyFinder(object):
    """Finds modules as ``PathFinder`` does (it stands just before it on
    ``sys.meta_path``), and makes those found under ``root`` (the plugin's
    directory, or its installed package's) load from their sources through
    :class:`_SourceOnlyLoader`. A module there that is bytecode without a
    source is refused; an extension module there is hashed before it is
    loaded, by :func:`_guard_loaders`. Modules elsewhere (the standard
    library, the plugin's dependencies) load as Python loads them."""

    def __init__(self, root, checked=None, own=None, only=None):
        self.root = root
        self.checked = checked
        # An installed top-level single-file module's file (``solo.py`` of
        # ``solo:Plugin``): its directory is ``site-packages``, every other
        # package's too, whose bytecode is theirs (refused, each import of
        # torch compiled from source at every start).
        self.only = only
        self.real_only = os.path.realpath(only) if only is not None else None
        # The top-level name the manifest's entrypoint names (``email`` of
        # ``email.plugin``): the plugin's own, even named like a standard
        # module.
        self.own = own
        # Where the tree lies once links are resolved: a plugin reached
        # through a linked plugins directory that loads its files by
        # ``os.path.realpath(__file__)`` names them so. A checked tree's
        # was resolved already.
        self.real_root = checked.real_root if checked is not None else os.path.realpath(root)
        # Only for a plugin that is not checked: a signed or pinned one's
        # files are all its own, the virtual environment's included (which
        # no signature covers, so nothing there is imported).
        self.installation = _installation_in(self.root, self.real_root) if checked is None else ()

    def covers(self, path):
        """Whether ``path`` is in the tree: of a signed or pinned plugin by
        :meth:`_Checked.under`, else by the path as given, under the root
        as given or as resolved (resolving every path would cost each
        import of the standard library a ``realpath``). Never the files of
        the interpreter's own installation when it lies in the tree (see
        :func:`_installation_in`)."""
        if self.installation:
            where = os.path.abspath(path)
            if any(where.startswith(p + os.sep) for p in self.installation):
                return False
        if self.checked is not None:
            return self.checked.under(path)
        where = os.path.abspath(path)
        if self.only is not None:
            return where in (self.only, self.real_only)
        return (where.startswith(self.root + os.sep)
                or where.startswith(self.real_root + os.sep))

    def find_spec(self, name, path=None, target=None):
        machinery = importlib.machinery
        spec = machinery.PathFinder.find_spec(name, path, target)
        origin = getattr(spec, "origin", None)
        if (path is None and isinstance(origin, str) and "." not in name and name != self.own
                and name in _standard_library_names() and self.covers(origin)):
            # A module of the plugin's named like a standard one (constants
            # in a ``platform.py``, a ``random.py``): the plugin directory
            # goes first on ``sys.path``, where it replaced the standard
            # module for every importer (``uuid``, numpy), and the plugin
            # failed to import; the Python original imports ``plugin.py``
            # by its path, nothing of its directory on ``sys.path``. The
            # standard module is found past the plugin's directory.
            rest = [p for p in sys.path
                    if not (isinstance(p, str) and os.path.abspath(p or ".") in (self.root, self.real_root))]
            spec = machinery.PathFinder.find_spec(name, rest, target)
            origin = getattr(spec, "origin", None)
        if not isinstance(origin, str) or not self.covers(origin):
            return spec  # not found, a namespace package, or not the plugin's
        if isinstance(spec.loader, machinery.SourcelessFileLoader):
            raise _bytecode_refused(name, origin)
        if isinstance(spec.loader, machinery.SourceFileLoader):
            spec.loader = _SourceOnlyLoader(name, origin, self.checked)
        elif (self.checked is not None
              and not isinstance(spec.loader, machinery.ExtensionFileLoader)):
            # A zip archive's module, say: no listed file's bytes.
            raise ImportError(
                "%s comes from %s, which the plugin's signature or pin does not cover "
                "(a module of a signed or pinned plugin is a .py file or an extension "
                "module of its tree): it is not imported" % (name, clean(origin)),
                name=name, path=origin)
        return spec  # an extension module: covered by pins and signatures


def _installation_in(root, real_root):
    """The interpreter's virtual environment (``sys.prefix``, holding
    ``pyvenv.cfg``) when it lies in the plugin's tree (``root`` as given,
    or ``real_root`` where it resolves: a plugins directory reached through
    a link, and a manifest naming the interpreter by its real path), by its
    path as given and as resolved: the manifest's ``"python":
    ".venv/bin/python"``. Its modules are installed packages, as those of a
    virtual environment outside the plugin are, and load with their
    bytecode (compiled from source at every start, a plugin importing sympy
    took six times as long to load). An unchecked plugin's only (see
    ``_SourceOnlyFinder``); an interpreter unpacked whole in the tree (no
    ``pyvenv.cfg``) is the plugin's files."""
    found = []
    for prefix in {sys.prefix, sys.exec_prefix}:
        if not isinstance(prefix, str) or not prefix:
            continue
        given, real = os.path.abspath(prefix), os.path.realpath(prefix)
        inside = given.startswith(root + os.sep) or real.startswith(real_root + os.sep)
        if inside and os.path.isfile(os.path.join(given, "pyvenv.cfg")):
            found += [given, real]
    return tuple(found)


def _single_module_file(root, module):
    """The file of ``module`` when it is a top-level single-file module
    directly in ``root`` (``root/solo.py``, no package ``root/solo``), an
    installed plugin's whose directory is ``site-packages``; else None."""
    if not module or "." in module:
        return None
    path = os.path.join(root, module + ".py")
    if os.path.isfile(path) and not os.path.isdir(os.path.join(root, module)):
        return path
    return None


def _source_only_under(root, checked=None, own=None, only=None):
    """Modules found under ``root`` (the plugin directory or installed
    package, subpackages included) load from sources and extension modules
    only, never from bytecode, and with ``checked`` only from the checked
    bytes: see :class:`_SourceOnlyFinder`; and so does a file of the tree
    that the plugin loads through ``importlib``'s own loaders by its path
    (``importlib.util.spec_from_file_location``): see :func:`_guard_loaders`."""
    finder = _SourceOnlyFinder(root, checked, own, only)
    path_finder = importlib.machinery.PathFinder
    at = sys.meta_path.index(path_finder) if path_finder in sys.meta_path else 0
    sys.meta_path.insert(at, finder)
    _guard_loaders(finder)


def _guard_loaders(finder):
    """``importlib``'s ``SourceFileLoader`` and ``SourcelessFileLoader``,
    for every loader made of them (also by a plugin that calls
    ``spec_from_file_location`` on a file of its tree, which no finder
    sees), treat a file under ``finder``'s tree as :class:`_SourceOnlyLoader`
    does: its bytecode is never read or written, its source must be the
    checked bytes (``finder.checked``), and bytecode without a source is
    refused; and ``ExtensionFileLoader`` hashes an extension module there
    before it loads it (whoever found it: the finder too). Files elsewhere
    load as before. Once per runner."""
    machinery = importlib.machinery
    source, sourceless = machinery.SourceFileLoader, machinery.SourcelessFileLoader
    if getattr(source, "_forgesyte_guarded", False):
        return
    source_get_code, get_data = source.get_code, source.get_data
    sourceless_get_code = sourceless.get_code

    known = {}  # path -> ours(path): a module's source is asked of twice

    def ours(path):
        if not isinstance(path, str):
            return False
        found = known.get(path)
        if found is None:
            found = finder.covers(path)
            if len(known) < 65536:
                known[path] = found
        return found

    def guarded_source_get_code(self, fullname):
        if isinstance(self, _SourceOnlyLoader) or not ours(self.path):
            return source_get_code(self, fullname)
        # Compiled from the (checked) source alone: no bytecode is read,
        # and none written. ``path_stats`` is left alone, so that a plugin
        # may still compile its files itself (``py_compile``).
        path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(path), path)

    def guarded_get_data(self, path):
        data = get_data(self, path)
        if (finder.checked is not None and path == self.path
                and not isinstance(self, _SourceOnlyLoader) and ours(path)):
            finder.checked.check(path, data)
        return data

    def guarded_get_code(self, fullname):
        path = self.get_filename(fullname)
        if ours(path):
            raise _bytecode_refused(fullname, path)
        return sourceless_get_code(self, fullname)

    extension = machinery.ExtensionFileLoader
    create_module = extension.create_module

    def guarded_create_module(self, spec):
        if finder.checked is not None and ours(self.path):
            with open(self.path, "rb") as f:
                finder.checked.check_file(f, self.path)
        return create_module(self, spec)

    source.get_code = guarded_source_get_code
    source.get_data = guarded_get_data
    sourceless.get_code = guarded_get_code
    extension.create_module = guarded_create_module
    source._forgesyte_guarded = True


def import_plugin(args):
    """Imports the plugin's code: the module, or a WireError dict."""
    here = os.path.dirname(base.PACKAGE_DIR) if base.PACKAGE_DIR else None
    if sys.path and (not sys.path[0] or os.path.abspath(sys.path[0]) == here):
        # Neither the runner's own directory nor, under ``-c``, the working
        # directory ("") may shadow plugin modules.
        del sys.path[0]
    checked = None
    if args.plugin_dir:
        root = os.path.abspath(args.plugin_dir)
        if args.sources is not None:
            checked = _Checked(root, args.sources)
        own = args.module.partition(".")[0] if args.module and not args.installed else None
        only = (_single_module_file(root, args.module)
                if args.installed and checked is None else None)
        _source_only_under(root, checked, own, only)
        if not args.installed:
            sys.path.insert(0, root)
    if args.file is not None:
        path = args.file
        if not os.path.isfile(path):
            # A FIFO or a device is there, not a file: said so, not "not
            # found" (its import would wait for a writer, or read forever).
            what = "is not a regular file" if os.path.exists(path) else "not found"
            return wire_error(
                "Python",
                "%s %s in %s" % (os.path.basename(path), what, args.plugin_dir),
                error_type="ImportError",
                path=path,
            )
        name = "plugin_" + _sanitize(args.plugin)
        try:
            spec = importlib.util.spec_from_file_location(
                name, path, loader=_SourceOnlyLoader(name, path, checked))
            if spec is None or spec.loader is None:
                return wire_error("Python", "cannot load %s as Python" % path,
                                  error_type="ImportError", path=path)
            module = importlib.util.module_from_spec(spec)
            # Registered first: dataclasses, pydantic and pickling look
            # classes' modules up by name.
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        except BaseException as e:  # SystemExit too: the plugin fails, not the runner
            out_of_memory_unless_raised(e, "importing the plugin")
            sys.modules.pop(name, None)
            error = _with_import_hint(python_error(e), e, relative=True, root=args.plugin_dir)
            error["path"] = clean(_syntax_error_file(e) or path)
            return error
    try:
        if args.plugin_dir and not args.installed:
            _package_is_the_directory(os.path.abspath(args.plugin_dir), args.module, checked)
        return importlib.import_module(args.module)
    except BaseException as e:
        out_of_memory_unless_raised(e, "importing the plugin")
        error = _with_import_hint(
            python_error(e), e, relative=False, root=None if args.installed else args.plugin_dir)
        if _syntax_error_file(e):
            error["path"] = clean(_syntax_error_file(e))
        return error


_standard_names = []  # the standard library's top-level module names, once found


def _standard_library_names():
    """The top-level names of the standard library's modules:
    ``sys.stdlib_module_names`` (3.10+), else those found in its directory
    and ``lib-dynload`` (the sources, packages and extension modules there)."""
    names = getattr(sys, "stdlib_module_names", None)
    if names is not None:
        return names
    if not _standard_names:
        found = set(sys.builtin_module_names)
        stdlib = os.path.dirname(os.path.abspath(getattr(os, "__file__", "") or "."))
        for where in (stdlib, os.path.join(stdlib, "lib-dynload")):
            try:
                entries = os.listdir(where)
            except OSError:
                continue
            for entry in entries:
                name = entry.split(".", 1)[0]
                if entry.endswith((".py", ".so")) or os.path.isfile(os.path.join(where, entry, "__init__.py")):
                    found.add(name)
        found.discard("site-packages")
        _standard_names.append(frozenset(found))
    return _standard_names[0]


# Said after the message of a relative import in a plugin file.
RELATIVE_IMPORT_HINT = (
    "plugin.py is imported as a top-level module, its directory first on "
    "sys.path: import a module beside it as `import helpers`, not "
    "`from .helpers import ...`")


def _with_import_hint(error, exc, relative, root=None):
    """``error`` (of ``exc``) with a hint for the import mistakes authors
    make: a relative import in plugin.py (``relative``: a plugin file, not
    a package's module), a module of the plugin directory ``root`` named
    like a standard one (passed over for it), and a package installed with
    ``pip install --user`` (runners read no user site-packages)."""
    hint = None
    passed_over = _passed_over(exc, root)
    if relative and isinstance(exc, ImportError) and "no known parent package" in str(exc):
        hint = RELATIVE_IMPORT_HINT
    elif passed_over:
        hint = ("the plugin's own %s is passed over for the standard library's %s module, "
                "which every module imports by that name: rename it"
                % (passed_over, passed_over.rstrip("/").rsplit(".py", 1)[0]))
    elif isinstance(exc, ModuleNotFoundError) and exc.name:
        user = _in_user_site(exc.name)
        if user:
            hint = ("%r is installed in the user site-packages (%s), which plugin runners "
                    "do not read: install it into %s, or into a virtual environment "
                    "the manifest's \"python\" or the server's --python names"
                    % (exc.name.split(".")[0], user, sys.executable))
    if hint:
        error["message"] = clean_capped("%s (%s)" % (error["message"], hint))
    return error


def _passed_over(exc, root):
    """The file or package (``email/``, ``token.py``) of plugin directory
    ``root`` that ``exc`` may come from missing: a module named like a
    standard one, which the runner's finder passes over for the standard
    module (a ``No module named 'email.helpers'``, ``cannot import name
    'API_KEY' from 'token'``, an ``AttributeError`` of module ``token``);
    None otherwise."""
    if not root:
        return None
    if isinstance(exc, ImportError):  # ``cannot import name 'X' from 'token'`` too
        name = exc.name or ""
    elif isinstance(exc, AttributeError):
        obj = getattr(exc, "obj", None)  # 3.10+
        name = getattr(obj, "__name__", "") if type(obj).__name__ == "module" else ""
    else:
        return None
    top = name.partition(".")[0]
    if not top or top not in _standard_library_names():
        return None
    for entry in (top + "/", top + ".py"):
        if os.path.exists(os.path.join(root, entry)):
            return entry
    return None


def _in_user_site(name):
    """The user site-packages directory when it holds the top-level module
    or package of ``name``, else None."""
    import site
    try:
        user = site.getusersitepackages()
    except (AttributeError, OSError):
        return None
    top = name.split(".")[0]
    if not isinstance(user, str) or not top:
        return None
    try:
        found = os.path.isdir(os.path.join(user, top)) or any(
            entry == top + ".py" or (entry.startswith(top + ".") and entry.endswith(".so"))
            for entry in os.listdir(user))
    except OSError:
        return None
    return user if found else None


def _package_is_the_directory(root, module, checked):
    """A plugin directory that is itself the package its entrypoint names
    (``forgesyte_ocr/`` holding ``manifest.json``, the entrypoint
    ``forgesyte_ocr.plugin``: the published layout, served from its
    sources) is imported as that package, from its own directory: on
    ``sys.path`` it holds the package's modules, not the package, and its
    parent may be neither readable nor the plugin's. Without
    ``__init__.py`` (an implicit namespace package, PEP 420, as the
    published OCR plugin's) the package is the directory alone."""
    top, _, rest = module.partition(".")
    if top in sys.modules or os.path.basename(root) != top:
        return
    init = os.path.join(root, "__init__.py")
    if not os.path.isfile(init):
        if _holds_module(root, rest.partition(".")[0]) and not os.path.exists(
                os.path.join(root, top)) and not os.path.exists(init):
            # No loader: module_from_spec makes it a namespace package.
            spec = importlib.machinery.ModuleSpec(top, None, is_package=True)
            spec.submodule_search_locations = [root]
            sys.modules[top] = importlib.util.module_from_spec(spec)
        return
    spec = importlib.util.spec_from_file_location(
        top, init, loader=_SourceOnlyLoader(top, init, checked),
        submodule_search_locations=[root])
    package = importlib.util.module_from_spec(spec)
    sys.modules[top] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        sys.modules.pop(top, None)
        raise


def _holds_module(root, name):
    """Whether ``root`` holds module or package ``name`` (``plugin.py``,
    ``plugin/``, an extension module): the directory is then the namespace
    package of its entrypoint, not a checkout holding the package (a
    ``forgesyte_ocr/`` inside) or a manifest naming an installed one."""
    if not name:
        return False
    if os.path.isfile(os.path.join(root, name + ".py")) or os.path.isdir(
            os.path.join(root, name)):
        return True
    try:
        return any(entry.startswith(name + ".") and entry.endswith(".so")
                   for entry in os.listdir(root))
    except OSError:
        return False


def _syntax_error_file(exc):
    if isinstance(exc, SyntaxError) and isinstance(getattr(exc, "filename", None), str):
        return exc.filename
    return None


def _plugin_shaped(cls):
    if isinstance(getattr(cls, "tools", None), (dict, list)):
        return True
    if callable(getattr(cls, "run_tool", None)):
        return True
    return any("tools" in getattr(k, "__annotations__", {}) for k in cls.__mro__)


def find_class(module, class_name):
    """The plugin class, or a WireError dict."""
    if class_name:
        # An attribute path, as an entry point may name one
        # (``module:Outer.Plugin``).
        cls = module
        for part in class_name.split("."):
            cls = getattr(cls, part, None)
            if cls is None:
                break
        if cls is None:
            return wire_error(
                "Python", "No '%s' class found in module" % class_name, error_type="AttributeError"
            )
        return cls
    cls = getattr(module, "Plugin", None)
    if cls is not None:
        return cls
    # Fallback: ForgeSyte BasePlugin subclasses are often named after the
    # plugin (OCRPlugin, YoloTrackerPlugin, ...) rather than `Plugin`. When
    # the module has no `Plugin`, take its one plugin-shaped class: a class
    # with a `tools` attribute (dict or list, possibly only annotated, as on
    # BasePlugin) or a `run_tool` method, not abstract, and not a base
    # class of another such class (so the local `class BasePlugin` stub that
    # published plugins define when the server's `app.plugins.base` is
    # missing is skipped). Classes defined in the module count first; when
    # there are none, classes it imports.
    values = [v for v in vars(module).values() if isinstance(v, type)]
    own = [v for v in values if v.__module__ == module.__name__]
    found = []
    for group in (own, values):
        found = [c for c in group if _plugin_shaped(c) and not getattr(c, "__abstractmethods__", None)]
        found = [c for c in found if not any(o is not c and issubclass(o, c) for o in found)]
        found = [c for c in found if c.__name__ != "BasePlugin"]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            break
    if len(found) > 1:
        names = ", ".join(sorted(c.__name__ for c in found))
        return wire_error(
            "Python",
            "No 'Plugin' class found in module, and %d plugin-shaped classes (%s): "
            "name the plugin's class Plugin, or name it in the manifest's "
            "\"entrypoint\" (\"MODULE:CLASS\", \"plugin:CLASS\" for plugin.py)"
            % (len(found), names),
            error_type="AttributeError")
    return wire_error(
        "Python", "No 'Plugin' class found in module", error_type="AttributeError"
    )


def check_name(instance, served):
    """ForgeSyte's ``BasePlugin`` carries a ``name`` (a class or an instance
    attribute), under which ForgeSyte's server registered the plugin. This
    host names a plugin before any of its code runs (``served``: its
    manifest's ``id``, else its ``name``, else its entry point's or
    directory's), so a ``name`` that says otherwise is logged for the author
    to make the two agree."""
    try:
        declared = getattr(instance, "name", None)
    except Exception:  # a property of the plugin's own that raises
        return
    if isinstance(declared, str) and declared and isinstance(served, str) and declared != served:
        diag("the plugin's name attribute says %r, but it is served as %r "
              "(its manifest's id or name, else its entry point's or directory's)" % (declared, served))
