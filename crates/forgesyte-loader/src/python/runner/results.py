"""Values between the wire and Python: attachments put into the call's
arguments at their JSON Pointers (RFC 6901, as
``forgesyte_protocol::wire::attach::place``), and a tool's result turned
into JSON plus attachments."""

import json
import math
import sys

# Taken before any plugin code runs (see wire._JSON_DECODE).
_json_dumps = json.dumps

_MISSING = object()


class PointerError(Exception):
    def __init__(self, pointer, detail):
        Exception.__init__(self, "attachment pointer %s: %s" % (_json_dumps(pointer), detail))


def _unescape(token):
    return token.replace("~1", "/").replace("~0", "~")


def _escape(key):
    return key.replace("~", "~0").replace("/", "~1")


# An array index of more digits names no element of any list.
_MAX_INDEX_DIGITS = 18


def _resolve(root, pointer):
    """The value at ``pointer`` (serde_json's ``pointer_mut``), or _MISSING."""
    if pointer == "":
        return root
    if not pointer.startswith("/"):
        return _MISSING
    target = root
    for token in pointer.split("/")[1:]:
        token = _unescape(token)
        if isinstance(target, dict):
            target = target.get(token, _MISSING)
        elif isinstance(target, list):
            if token.startswith("+") or (token.startswith("0") and len(token) != 1):
                return _MISSING
            # More digits than any list has elements (and than ``int``
            # converts): no element.
            if (not token.isdigit() or not token.isascii() or len(token) > _MAX_INDEX_DIGITS
                    or int(token) >= len(target)):
                return _MISSING
            target = target[int(token)]
        else:
            return _MISSING
        if target is _MISSING:
            return _MISSING
    return target


def place(root, pointer, value):
    """Puts ``value`` at ``pointer`` in ``root`` and returns the new root:
    the empty pointer replaces the root; otherwise the parent must exist and
    be an object (key inserted or replaced) or an array (an existing index
    replaced)."""
    if pointer == "":
        return value
    if "/" not in pointer:
        raise PointerError(pointer, "does not start with '/'")
    parent_pointer, last = pointer.rsplit("/", 1)
    key = _unescape(last)
    parent = _resolve(root, parent_pointer)
    if isinstance(parent, dict):
        parent[key] = value
    elif isinstance(parent, list):
        # RFC 6901: an index is "0" or digits without a leading zero.
        canonical = key == "0" or (
            key != "" and not key.startswith("0") and key.isascii() and key.isdigit()
            and len(key) <= _MAX_INDEX_DIGITS
        )
        if not canonical or int(key) >= len(parent):
            raise PointerError(pointer, "names no element of its array")
        parent[int(key)] = value
    elif parent is _MISSING:
        raise PointerError(pointer, "its parent does not exist")
    else:
        raise PointerError(pointer, "its parent is neither an object nor an array")
    return root


# ---------------------------------------------------------------------------
# Results: Python values to JSON plus attachments
# ---------------------------------------------------------------------------


class ResultError(Exception):
    def __init__(self, error_type, message):
        Exception.__init__(self, message)
        self.error_type = error_type


def _where(path):
    return " (at %s)" % path if path else ""


def _json_key(key, path):
    if isinstance(key, str):
        return key
    # Like json.dumps: scalar keys become their JSON text.
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        return _json_dumps(key)
    raise ResultError(
        "TypeError",
        "tool result has a dict key of type %s, not a string%s" % (type(key).__name__, _where(path)),
    )


_BYTES = (bytes, bytearray, memoryview)


class _NoFallback(Exception):
    """The JSON-mode fallback does not apply to this model."""


def _where_bytes(python, depth=0):
    """pydantic's nested ``exclude`` of the places a model's Python-mode dump
    holds bytes (``True`` at each), or None where it holds none. Only
    under string keys (field names, dict keys): bytes in a list, or under
    another key (or pydantic's ``__all__``), raise _NoFallback (excluding
    by list index costs pydantic the square of the list's length)."""
    if depth >= MAX_DEPTH:
        raise _NoFallback()
    if isinstance(python, _BYTES):
        return True
    if isinstance(python, dict):
        spec = {}
        for key, value in python.items():
            where = _where_bytes(value, depth + 1)
            if where is not None:
                if not isinstance(key, str) or key == "__all__":
                    raise _NoFallback()
                spec[key] = where
        return spec or None
    if isinstance(python, (list, tuple, set, frozenset)):
        for value in python:
            if _where_bytes(value, depth + 1) is not None:
                raise _NoFallback()
    return None


def _with_bytes(python, as_json, spec):
    """A model's JSON-mode dump ``as_json``, made with ``exclude=spec``,
    with the bytes of its Python-mode dump ``python`` put back where they
    were (binary results, not text). A JSON dump of another shape (a
    serialiser that renames or nests) raises _NoFallback."""
    if spec is True:
        return python
    if not isinstance(python, dict) or not isinstance(as_json, dict):
        raise _NoFallback()
    excluded = {key for key, where in spec.items() if where is True}
    if set(as_json) != set(python) - excluded:
        raise _NoFallback()
    out = dict(as_json)
    for key, where in spec.items():
        out[key] = python[key] if where is True else _with_bytes(python[key], as_json[key], where)
    return out


def _json_mode(model, dumped):
    """``model`` dumped in JSON mode (serialisers that apply there only),
    with the bytes of its Python-mode dump ``dumped`` kept as bytes;
    _NoFallback where that cannot be done."""
    try:
        where = _where_bytes(dumped)
        if not where:
            return model.model_dump(mode="json")
        return _with_bytes(dumped, model.model_dump(mode="json", exclude=where), where)
    except (_NoFallback, MemoryError):
        raise
    except Exception:
        raise _NoFallback()


def _pydantic_leaf(value):
    """pydantic's own JSON form of a field value, for values inside a
    pydantic model (datetimes, enums, UUIDs, ...)."""
    try:
        import pydantic_core

        return pydantic_core.to_jsonable_python(value)
    except ImportError:
        pass
    from pydantic.json import pydantic_encoder  # pydantic v1

    return pydantic_encoder(value)


# Arrays and objects nested this deep the host does not read (serde_json's
# limit): a result as deep is the call's error, ``ResultTooDeep``.
MAX_DEPTH = 128


# How many bytes of the answer limit each value of a result may stand for,
# and the fewest values any limit allows: the host's own bound
# (``json_text::max_result_values_for``; the host passes its figure,
# ``--max-result-values``), counted as the host counts (one, and one per
# ``,`` and ``:`` of the JSON text) and checked here as each array or
# object is met, before it is converted or encoded: a result of 40 million
# values (``[0] * 40_000_000``, 320 MB in Python) is refused at once, not
# after the runner ran out of memory encoding it.
RESULT_BYTES_PER_VALUE = 32
MIN_RESULT_VALUES = 1 << 16


def max_result_values(max_response):
    """The most values a result may hold under an answer limit of
    ``max_response`` bytes."""
    return max(MIN_RESULT_VALUES, max_response // RESULT_BYTES_PER_VALUE)


class _Blobs(list):
    """A result's bytes values, (pointer, bytes), and how many more values
    the result may hold (``left``), counted as the host counts them."""

    __slots__ = ("left", "most")

    def charge(self, count, path):
        self.left -= count
        if self.left < 0:
            raise ResultError(
                "ResultTooLarge",
                "the tool's result holds more than %d JSON values, more than an answer may "
                "hold (one per %d bytes of the server's --max-response)%s"
                % (self.most, RESULT_BYTES_PER_VALUE, _where(path)),
            )


def _convert(blobs, x, path, in_model, depth=0):
    """One value of ``to_wire``'s result, its bytes appended to ``blobs``
    (a ``_Blobs``, charged for each array's and object's members)."""
    if x is None or isinstance(x, (str, bool)):
        return x
    if isinstance(x, int):
        # The host reads an integer beyond 64 bits as a float: one
        # beyond a float's range it cannot read at all.
        if abs(x) > sys.float_info.max:
            raise ResultError(
                "ValueError",
                "tool result contains an integer of %d bits, beyond the range of "
                "the numbers the host reads (about 1.8e308)%s" % (x.bit_length(), _where(path)),
            )
        return x
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ResultError(
                "ValueError",
                "tool result contains the non-finite number %r, which JSON cannot carry%s"
                % (x, _where(path)),
            )
        return x
    if isinstance(x, _BYTES):
        blobs.append((path, x if type(x) is bytes else bytes(x)))
        return None
    if isinstance(x, (dict, list, tuple)) and depth + 1 >= MAX_DEPTH:
        # Counted here, not left to the interpreter's recursion limit,
        # which the plugin sets: a result that holds itself under a
        # raised limit took memory as the square of its depth (each
        # level's path longer) until the runner ran out.
        raise ResultError(
            "ResultTooDeep",
            "the tool's result nests arrays and objects %d or more levels deep, deeper "
            "than the host reads (or contains itself)%s" % (MAX_DEPTH, _where(path)),
        )
    if isinstance(x, dict):
        # A comma between members, a colon in each.
        blobs.charge(2 * len(x) - 1 if x else 0, path)
        out = {}
        for k, v in x.items():
            key = _json_key(k, path)
            if key in out:
                # 1 and "1" are one JSON key: one value would be lost.
                raise ResultError(
                    "ValueError",
                    "tool result has the key %s twice (keys of different types that JSON "
                    "writes alike)%s" % (_json_dumps(key), _where(path)),
                )
            out[key] = _convert(blobs, v, path + "/" + _escape(key), in_model, depth + 1)
        return out
    if isinstance(x, (list, tuple)):
        blobs.charge(len(x) - 1 if x else 0, path)
        # Its own elements, as json's encoder takes them: a subclass's
        # ``__iter__`` (an endless one) is not asked.
        items = list.__iter__(x) if isinstance(x, list) else tuple.__iter__(x)
        return [_convert(blobs, v, "%s/%d" % (path, i), in_model, depth + 1) for i, v in enumerate(items)]
    kind = type(x)
    # pydantic v2 models: python-mode dump keeps bytes as bytes (they
    # become attachments); other field values go through pydantic.
    if callable(getattr(kind, "model_dump", None)) and hasattr(kind, "model_fields"):
        dumped = x.model_dump()
        mark, left = len(blobs), blobs.left
        try:
            return _convert(blobs, dumped, path, True, depth)
        except ResultError as e:
            if e.error_type != "TypeError":
                raise
            del blobs[mark:]
            blobs.left = left
            # Serialisers that apply in JSON mode only (``when_used=
            # "json"``, a model serialiser asking ``info.mode``): its
            # JSON dump, bytes still taken from the Python one.
            try:
                as_json = _json_mode(x, dumped)
            except _NoFallback:
                raise e
            return _convert(blobs, as_json, path, False, depth)
    # pydantic v1 models.
    if hasattr(kind, "__fields__") and callable(getattr(x, "dict", None)):
        return _convert(blobs, x.dict(), path, True, depth)
    if hasattr(kind, "__dataclass_fields__"):
        import dataclasses  # loaded already: the plugin made the class

        # One level at a time, as for a dict: ``dataclasses.asdict``
        # deep-copies every value (a numpy array in full; a memoryview
        # cannot be copied at all).
        fields = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
        return _convert(blobs, fields, path, in_model, depth)
    # numpy scalars and arrays, without importing numpy.
    if kind.__module__ == "numpy" and callable(getattr(x, "tolist", None)):
        # Before its list is made: forty million floats of an array are
        # more than a gigabyte of Python objects.
        size = getattr(x, "size", 0)
        if isinstance(size, int) and size - 1 > blobs.left:
            blobs.charge(size - 1, path)
        return _convert(blobs, x.tolist(), path, in_model, depth)
    if in_model:
        try:
            leaf = _pydantic_leaf(x)
        except MemoryError:
            raise
        except Exception:
            leaf = x
        if leaf is not x and type(leaf) is not kind:
            return _convert(blobs, leaf, path, False, depth)
    raise ResultError(
        "TypeError",
        "tool result of type %s is not JSON-serialisable%s" % (kind.__name__, _where(path)),
    )


def _unencodable(value, path):
    """(pointer, text) of the first string or key in a converted value that
    UTF-8 cannot encode (one holding a lone surrogate), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path, value
        return None
    found = None
    if isinstance(value, dict):
        for k, v in value.items():
            inner = path + "/" + _escape(k)
            found = _unencodable(k, inner) or _unencodable(v, inner)
            if found:
                break
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _unencodable(v, "%s/%d" % (path, i))
            if found:
                break
    return found


def unencodable_error(value):
    """The ``UnicodeEncodeError`` ResultError of a converted result that
    cannot be sent, naming the text's place in the result (where the
    encoder's own message gives a position in the runner's whole answer),
    else None. Looked for only once the encoder failed."""
    found = _unencodable(value, "")
    if found is None:
        return None
    path, text = found
    at = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), 0)
    return ResultError(
        "UnicodeEncodeError",
        "tool result holds text that is not valid Unicode: %r at character %d is a lone "
        "surrogate%s" % (text[at], at, _where(path)),
    )


def to_wire(value, max_values=None):
    """Converts a tool's result to (JSON value, [(pointer, bytes)]): bytes
    anywhere are taken out as attachments (``null`` stays in their place).
    Raises ResultError (``ResultTooLarge`` past ``max_values`` values in
    its arrays and objects; None: no bound)."""
    blobs = _Blobs()
    blobs.most = float("inf") if max_values is None else max_values
    blobs.left = blobs.most - 1  # the result itself is one
    # A module function, not a closure: a nested function that calls itself
    # is a reference cycle, which kept each result's list of bytes alive
    # until the garbage collector ran (a runner returning 16 MiB frames
    # ran out of memory in 28 calls).
    try:
        converted = _convert(blobs, value, "", False)
    except RecursionError:
        raise ResultError("RecursionError", "tool result is nested too deeply (or contains itself)")
    return converted, blobs
