"""A plugin's tools as the host sees them (``created``'s ``tools``): from
the live instance's ``tools`` (ForgeSyte's ``BasePlugin`` shape) or the
manifest's, their schemas normalised, and what the runner needs to call
each one."""

import types

from .base import diag
from .results import ResultError, to_wire, unencodable_error


ANY_OBJECT = {"type": "object"}
_SCHEMA_KEYWORDS = frozenset(
    """$schema $ref $id $defs definitions type properties patternProperties
    additionalProperties required items prefixItems enum const anyOf oneOf allOf
    not if then else format contentEncoding contentMediaType minimum maximum
    minLength maxLength pattern minItems maxItems default examples title
    description""".split()
)


def _looks_like_schema(d):
    """A JSON Schema names its ``type``, or has schema keywords only: a
    bare property map may name a property ``format`` or ``title`` too
    (``{"image_base64": "string", "format": "string"}``)."""
    if isinstance(d.get("type"), (str, list)):
        return True
    return all(key in _SCHEMA_KEYWORDS for key in d)


def _is_bytes(spec):
    """Whether a property's schema has ForgeSyte's type ``bytes`` (not a
    JSON Schema type)."""
    return isinstance(spec, dict) and spec.get("type") == "bytes"


def _binary_if_bytes(spec):
    """A property's schema, with the type ``bytes`` written as the binary
    string it means: the host and ``binary_properties`` know a binary
    property by its ``format``. A copy: the plugin's own dict stays as it
    wrote it."""
    if _is_bytes(spec):
        return dict(spec, type="string", format="binary")
    return spec


def _bytes_properties_binary(schema):
    """A full JSON Schema whose top-level ``properties`` (the arguments the
    host hands as bytes) have ``bytes`` made binary; the schema itself when
    none has it (deeper ones are the plugin's business: the host only ever
    places binary arguments at the top level)."""
    props = schema.get("properties")
    if not isinstance(props, dict) or not any(_is_bytes(spec) for spec in props.values()):
        return schema
    return dict(schema, properties=dict((name, _binary_if_bytes(spec)) for name, spec in props.items()))


def normalize_schema(schema):
    """A JSON Schema for a tool's inputs or outputs. ForgeSyte plugins and
    manifests also write a bare property map (``{"image_base64": "string"}``
    or ``{"frame_base64": {"type": "string"}}``) or a list of input names;
    those become ``{"type": "object", "properties": {...}}``. The type
    ``bytes`` of a property (``{"image_bytes": {"type": "bytes"}}``, as
    ForgeSyte's moderation plugin writes it; not a JSON Schema type) is a
    binary property, ``{"type": "string", "format": "binary"}``, in such a
    map and among the top-level ``properties`` of a full JSON Schema alike:
    a plugin that writes the full form means the same bytes. Only the type
    ``bytes`` exactly; the plugin's dicts are copied, never changed."""
    if schema is None:
        return dict(ANY_OBJECT)
    if isinstance(schema, type):
        # A pydantic model class given as the schema.
        for method in ("model_json_schema", "schema"):
            if callable(getattr(schema, method, None)):
                return getattr(schema, method)()
        return dict(ANY_OBJECT)
    if isinstance(schema, (list, tuple)):
        names = [n for n in schema if isinstance(n, str)]
        if not names:
            return dict(ANY_OBJECT)
        return {"type": "object", "properties": dict((n, {}) for n in names)}
    if isinstance(schema, dict):
        if not schema:
            return schema
        if _looks_like_schema(schema):
            return _bytes_properties_binary(schema)
        if all(isinstance(v, (dict, str)) for v in schema.values()) and all(
            isinstance(k, str) for k in schema
        ):
            props = {}
            for name, spec in schema.items():
                spec = {"type": spec} if isinstance(spec, str) else spec
                props[name] = _binary_if_bytes(spec)
            return {"type": "object", "properties": props}
        return schema
    return schema


def _manifest_tools(manifest):
    """The manifest's tools as (id, dict) pairs: a list of dicts with
    ``id`` or ``name``, or a dict id -> dict."""
    if not isinstance(manifest, dict):
        return []
    tools = manifest.get("tools")
    out = []
    if isinstance(tools, dict):
        for tid, meta in tools.items():
            if isinstance(tid, str):
                out.append((tid, meta if isinstance(meta, dict) else {}))
    elif isinstance(tools, list):
        for meta in tools:
            if isinstance(meta, dict):
                tid = meta.get("id", meta.get("name"))
                if isinstance(tid, str):
                    out.append((tid, meta))
            elif isinstance(meta, str):
                out.append((meta, {}))
    return out


def _instance_tools(raw):
    """``instance.tools`` as (id, dict) pairs. ForgeSyte's BasePlugin shape
    is a dict tool name -> {"handler", "description", "input_schema",
    "output_schema"}; a list of dicts with ``id``/``name`` is accepted too."""
    out = []
    if isinstance(raw, dict):
        for tid, meta in raw.items():
            if not isinstance(tid, str):
                raise TypeError("tool names must be strings, not %s" % type(tid).__name__)
            # (A classmethod object of the class body is not callable, nor
            # a staticmethod one before Python 3.10.)
            if (callable(meta) or isinstance(meta, (staticmethod, classmethod))) \
                    and not isinstance(meta, dict):
                meta = {"handler": meta}
            if not isinstance(meta, dict):
                raise TypeError("tool %r must be described by a dict, not %s" % (tid, type(meta).__name__))
            out.append((tid, meta))
    elif isinstance(raw, (list, tuple)):
        for meta in raw:
            if isinstance(meta, str):
                out.append((meta, {}))
                continue
            if not isinstance(meta, dict):
                raise TypeError("each tool must be a dict, not %s" % type(meta).__name__)
            tid = meta.get("id", meta.get("name"))
            if not isinstance(tid, str):
                raise TypeError("a tool in the list has no string 'id' or 'name'")
            out.append((tid, meta))
    else:
        raise TypeError("the plugin's 'tools' must be a dict or a list, not %s" % type(raw).__name__)
    return out


def _first(*values):
    for value in values:
        if value is not None:
            return value
    return None


def _as_method(instance, fn):
    """``fn`` bound to ``instance`` when it is a function of the body of the
    instance's class (``"handler": Plugin.detect``: the function, not the
    method); else ``fn`` as it is (a function of a module)."""
    name = getattr(fn, "__name__", None)
    for klass in type(instance).__mro__:
        if klass.__dict__.get(name) is fn:
            return fn.__get__(instance, type(instance))
    return fn


def resolve_handler(instance, tid, handler):
    """What a call of tool ``tid`` calls, for a plugin without
    ``run_tool()``: its handler, a callable or the name of the instance's
    method (none: the method named like the tool), looked up at each call
    (a plugin may rebind its methods); a ``staticmethod`` or
    ``classmethod`` object taken from the class body, or a function of it,
    bound as the class would bind it. Raises when there is nothing to
    call (at construction, for the instance's own ``tools``: an
    ``InitError`` naming the tool, as ForgeSyte's ``BasePlugin`` refuses a
    handler that is not callable)."""
    if isinstance(handler, str) or handler is None:
        name = tid if handler is None else handler
        found = getattr(instance, name, None)
        if callable(found):
            return found
        if handler is None:
            raise AttributeError("tool '%s' has no handler and the plugin no run_tool()" % tid)
        raise AttributeError("the handler of tool '%s' names '%s', which is no method of %s"
                             % (tid, name, type(instance).__name__))
    if isinstance(handler, (staticmethod, classmethod)):
        return handler.__get__(instance, type(instance))
    if type(handler) is types.FunctionType:
        return _as_method(instance, handler)
    if not callable(handler):
        raise TypeError("the handler of tool '%s' must be callable or a method's name, not %s"
                        % (tid, type(handler).__name__))
    return handler


def check_tool_id(tid):
    """Raises ValueError for a tool name no client can call, which the host
    refuses (``forgesyte_protocol::ToolSpec``'s ``id``, rule for rule):
    empty, ``.`` or ``..`` (no URL path segment carries them), or holding
    a control character (Unicode category Cc)."""
    if tid in ("", ".", ".."):
        raise ValueError("tool name %r cannot be served: no URL path segment can carry it" % tid)
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in tid):
        raise ValueError("tool name %r holds a control character" % tid)


# A ValueError under the name the encoder's would have (the real class
# takes the codec's five arguments, not a message).
_SpecUnicodeError = type("UnicodeEncodeError", (ValueError,), {})


def _spec_error(tid, e):
    """A ResultError ``e`` of tool ``tid``'s spec, as the spec's error (its
    message speaks of a tool's result)."""
    message = str(e).replace("tool result", "value", 1).replace("the tool's result", "it", 1)
    # Of the kind the result's would be (a NaN is a ValueError); a kind no
    # Python class has (too deep) is a ValueError.
    kind = {"TypeError": TypeError, "RecursionError": RecursionError,
            "UnicodeEncodeError": _SpecUnicodeError}.get(e.error_type, ValueError)
    return kind("the spec of tool %r cannot be sent as JSON: %s" % (tid, message))


def _spec_to_wire(tid, spec):
    """``to_wire`` of a tool's spec, whose errors speak of the spec."""
    try:
        return to_wire(spec)
    except ResultError as e:
        raise _spec_error(tid, e) from None


def unencodable_spec(specs):
    """The error of the first of ``specs`` (converted ones, as ``created``
    carries them) holding text that is not valid Unicode, named where it
    is; else None. Looked for once the encoder failed on them."""
    for spec in specs:
        found = unencodable_error(spec)
        if found is not None:
            return _spec_error(spec.get("id"), found)
    return None


def _attribute(instance, name):
    """``instance.name``, or None when there is none or reading it raises
    (a seed class's ``__getattr__`` may raise anything: ``KeyError``)."""
    try:
        return getattr(instance, name, None)
    except MemoryError:
        raise
    except Exception:
        return None


def follows_the_tool_contract(instance):
    """Whether ``instance`` takes up ForgeSyte's plugin contract as a whole:
    it has a ``run_tool``, or its class derives from a class named
    ``BasePlugin`` (ForgeSyte's, or a published plugin's local fallback)."""
    if callable(_attribute(instance, "run_tool")):
        return True
    return any(getattr(c, "__name__", None) == "BasePlugin" for c in type(instance).__mro__)


def takes_up_the_contract(instance):
    """Whether ``instance`` is a plugin of ForgeSyte's contract, whose
    lifecycle hooks (``validate``, ``on_load``, ``on_unload``) are called:
    :func:`follows_the_tool_contract`, or its ``tools`` is a tool table
    that names a handler. Else it is a seed plugin, which the seed only
    constructed."""
    return follows_the_tool_contract(instance) or _names_a_handler(
        instance, _attribute(instance, "tools"))


def _names_a_handler(instance, raw):
    """Whether ``raw`` (an instance's ``tools``) is a dict or a list with at
    least one entry that names a handler: one given (``"handler"``, or the
    entry itself callable), or a method of the instance named like the
    tool (a tool without a handler calls it). A tool table, then (never
    raises)."""
    def method(name):
        return isinstance(name, str) and callable(getattr(instance, name, None))

    def names(tid, meta):
        if callable(meta) or isinstance(meta, (staticmethod, classmethod)):
            return True
        if isinstance(meta, dict):
            return meta.get("handler") is not None or method(
                tid if tid is not None else meta.get("id", meta.get("name")))
        return tid is None and method(meta)

    try:
        if isinstance(raw, dict):
            return any(names(tid, meta) for tid, meta in list(raw.items()))
        if isinstance(raw, (list, tuple)):
            return any(names(None, meta) for meta in list(raw))
        return False
    except Exception:
        return False


def collect_tools(instance, manifest, contract):
    """The instance's tools: (specs for ``created``, id -> dispatch info).

    From the live instance's ``tools`` when it has any; otherwise (no
    ``tools``, or an empty one, e.g. a plugin with only ``run_tool``) from
    the manifest's ``tools``. A manifest entry with the same id fills in
    what the instance's entry lacks (e.g. a ``title``).

    ``contract``: whether the plugin takes up ForgeSyte's contract
    (:func:`takes_up_the_contract`, decided once by the caller). Its tool
    table is held to the contract: what is wrong in it fails construction.
    A seed plugin's ``tools`` (not a dict or a list, a property that
    raises, or entries none of which names a handler: a list of names,
    descriptions alone) is its own attribute: said and left out, as the
    seed never read it."""
    if contract:
        return _collect_tools(instance, manifest, getattr(instance, "tools", None))
    try:
        raw = getattr(instance, "tools", None)
    except MemoryError:
        raise
    except Exception as e:
        _left_out("%s: %s" % (type(e).__name__, e))
    else:
        if raw:
            _left_out("a %s none of whose entries names a handler" % type(raw).__name__
                      if isinstance(raw, (dict, list, tuple))
                      else "a %s, not a dict or a list" % type(raw).__name__)
    return _collect_tools(instance, manifest, None)


def _left_out(why):
    diag("the plugin's `tools` is no tool table (%s): left out, as the seed's loader never "
         "read it (a ForgeSyte plugin's tools name their handlers, or the plugin has "
         "run_tool())" % why, warning=True)


def _collect_tools(instance, manifest, raw):
    # Without run_tool() every tool is called through its handler: each of
    # the instance's own is checked now, so a handler that names nothing
    # fails construction instead of every call. A tool only the manifest
    # lists, with no method of its name, is said and fails its calls (the
    # plugin's other tools serve).
    dispatched = not callable(_attribute(instance, "run_tool"))
    from_manifest = _manifest_tools(manifest)
    entries = _instance_tools(raw) if raw else from_manifest
    by_id = dict(from_manifest)
    specs = []
    table = {}
    for tid, meta in entries:
        if tid in table:
            diag("tool %r is listed twice; the first one counts" % tid)
            continue
        check_tool_id(tid)
        extra = by_id.get(tid, {})
        title = _first(meta.get("title"), extra.get("title"), tid)
        description = _first(meta.get("description"), extra.get("description"), "")
        inputs = normalize_schema(
            _first(meta.get("input_schema"), meta.get("inputs"),
                   extra.get("input_schema"), extra.get("inputs"))
        )
        outputs = normalize_schema(
            _first(meta.get("output_schema"), meta.get("outputs"),
                   extra.get("output_schema"), extra.get("outputs"))
        )
        spec = {
            "id": tid,
            "title": title if isinstance(title, str) else str(title),
            "description": description if isinstance(description, str) else str(description),
            "input_schema": inputs,
            "output_schema": outputs,
        }
        converted, blobs = _spec_to_wire(tid, spec)
        if blobs:
            raise TypeError("the spec of tool %r contains bytes" % tid)
        specs.append(converted)
        if dispatched:
            try:
                resolve_handler(instance, tid, meta.get("handler"))
            except (AttributeError, TypeError) as e:
                if raw:
                    raise
                diag("%s: its calls will fail" % e, warning=True)
        elif meta.get("handler") is not None:
            # run_tool() dispatches: a handler it would call that names
            # nothing is said now (its calls fail only when they come).
            try:
                resolve_handler(instance, tid, meta.get("handler"))
            except (AttributeError, TypeError) as e:
                diag("%s (run_tool dispatches it: its calls may fail)" % e, warning=True)
        table[tid] = {"handler": meta.get("handler"), "binary": binary_properties(inputs),
                      "zero_copy": meta.get("zero_copy") is True}
    # The instance's own tools are what it serves: one only the manifest
    # lists beside them is not served (a 404 its author would not expect).
    if raw:
        for tid, _ in from_manifest:
            if tid not in table:
                diag("tool %r is listed in manifest.json but not in the plugin's tools: "
                     "it is not served" % tid, warning=True)
    return specs, table


def _is_binary(spec):
    return isinstance(spec, dict) and (
        spec.get("format") == "binary" or spec.get("contentEncoding") == "base64")


def _is_optional_binary(spec):
    """``anyOf`` / ``oneOf`` of bytes and ``{"type": "null"}`` (pydantic's
    ``Optional[bytes]``)."""
    for key in ("anyOf", "oneOf"):
        alternatives = spec.get(key)
        if isinstance(alternatives, list) and any(_is_binary(a) for a in alternatives) and all(
                _is_binary(a) or (isinstance(a, dict) and a.get("type") == "null")
                for a in alternatives):
            return True
    return False


def binary_properties(schema):
    """Top-level properties the input schema declares binary (the host's
    ``body::binary_arguments``)."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict):
        return []
    return [
        name
        for name, spec in props.items()
        if isinstance(spec, dict) and (_is_binary(spec) or _is_optional_binary(spec))
    ]
