"""The wire (PROTOCOL.md §2–§3): frames on the private protocol
descriptors, their attachments inline or, above a threshold, in sealed
memory files passed over the shared-memory socket (§3.1); and the
requests' envelopes. Knows nothing of plugins."""

import fcntl
import json
import os
import struct
import threading

from .base import EXIT_CHANNEL, MIB, diag, exit_now

# The largest request frame accepted (the native runner's limit).
MAX_REQUEST_BYTES = 1 << 31
# The largest body a frame can announce (its length is a u32).
MAX_FRAME_BYTES = (1 << 32) - 1
# The most attachments of one frame (PROTOCOL.md §2, the Rust
# ``wire::frame::MAX_ATTACHMENTS``): a frame with more is malformed, a
# request this runner reads (exit 65) as an answer the host reads.
MAX_ATTACHMENTS = 65536
# Request bodies up to this size are read into one buffer allocated up
# front; larger ones grow as bytes arrive, so a garbage length does not
# allocate gigabytes before the stream ends.
READ_PREALLOCATE = 64 * MIB
# Request frames up to this size are read in one call.
SMALL_FRAME_BYTES = 64 * 1024

SHM_FD_ENV = "FORGESYTE_SHM_FD"
SHM_THRESHOLD_ENV = "FORGESYTE_SHM_THRESHOLD"
SHM_MAX_PER_FRAME = 64
MEMFD_NAME = "forgesyte-attachment"
# fcntl seals (linux/fcntl.h), for Pythons whose fcntl module lacks them.
_F_ADD_SEALS, _F_GET_SEALS = 1033, 1034
_F_SEAL_SEAL, _F_SEAL_SHRINK, _F_SEAL_GROW, _F_SEAL_WRITE = 1, 2, 4, 8

# The frame's fixed parts (PROTOCOL.md §2): the length, then the header's
# length and the attachment count.
_U32 = struct.Struct("<I")
_FRAME_TABLE = struct.Struct("<II")
_FRAME_HEAD = struct.Struct("<III")


def _identity(fd):
    """The (device, inode) of descriptor ``fd``; None when it is not open."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class ProtocolError(Exception):
    """The host broke the protocol: the runner exits 65."""


class Shared(object):
    """One attachment that came through shared memory: a sealed memory file
    (PROTOCOL.md §3.1), its descriptor held until ``take``.

    ``bytes`` (the default) are read straight from the file (``os.pread``:
    one copy, and no mapping whose pages fault in one by one, measured
    cheaper than copying out of a mapping); a ``zero_copy`` tool gets a
    read-only mapping. Either way the descriptor is closed by ``take`` (or
    when the attachment is dropped untaken)."""

    __slots__ = ("fd", "size")

    def __init__(self, fd, size):
        self.fd = fd
        self.size = size

    def __len__(self):
        return self.size

    def close(self):
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):
        self.close()

    def take(self, zero_copy):
        """The plugin's value: a read-only ``memoryview`` over a mapping
        (kept mapped while referenced), or ``bytes`` (a copy)."""
        import mmap
        try:
            if self.size == 0:
                return b""
            if not zero_copy:
                data = os.pread(self.fd, self.size, 0)
                if len(data) == self.size:
                    return data
            try:  # 3.13+: the mapping keeps no copy of the descriptor
                mapping = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ, trackfd=False)
            except TypeError:
                mapping = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)
            if zero_copy:
                return memoryview(mapping)
            data = mapping[:]
            mapping.close()
            return data
        finally:
            self.close()


def shm_socket(passed=None):
    """The shared-memory socket the host passed, and the threshold: (socket,
    threshold) or None; ``passed``: (descriptor, threshold) from a zygote,
    else they come from the environment. Marked close-on-exec: a plugin's
    subprocesses do not inherit it."""
    if passed is not None:
        fd, threshold = passed
    else:
        raw = os.environ.pop(SHM_FD_ENV, None)
        threshold = os.environ.pop(SHM_THRESHOLD_ENV, "65536")
        if raw is None:
            return None
        fd = int(raw)
        threshold = int(threshold)
    if fd <= 2 or threshold <= 0:
        return None
    # The C module, not ``socket``: its enums and wrappers cost about 5 ms
    # to import, in the zygote's start or in every runner, for a type that
    # adds nothing the runner uses.
    import _socket

    os.set_inheritable(fd, False)
    return _socket.socket(fileno=fd), threshold


def _sealed(data):
    """A sealed, close-on-exec memory file holding ``data``.

    A plugin that closed fd 1 or 2 would otherwise get the file there (the
    lowest free number), and its own writes to stdout or stderr, from any
    thread, would land in the result before the seal: the file is moved
    above 2 and emptied first, whatever reached it in between."""
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    if fd <= 2:
        try:
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        finally:
            os.close(fd)
        fd = high
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SEAL | _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd


_memfd_dev = []  # the device of this process's memory files, once found


def _memory_files_device():
    """The device (``st_dev``) of the files ``memfd_create`` makes: one
    tmpfs mount of the kernel's own, the same for every process (huge-page
    memory files are on hugetlbfs, another device)."""
    if not _memfd_dev:
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            _memfd_dev.append(os.fstat(fd).st_dev)
        finally:
            os.close(fd)
    return _memfd_dev[0]


def _check_shared_file(fd, st):
    """Refuses a shared attachment's file the receiver must not map
    (PROTOCOL.md §3.1): one not sealed against writes and resizing (its
    bytes could change under the plugin, its pages vanish), or one that is
    not a memory file of tmpfs (a huge-page memory file is mapped in whole
    huge pages). The Rust reader (``Mapping::of_sealed``) asks ``fstatfs``
    for tmpfs; here the file (``st``, its ``fstat``) must be on the device
    of this process's own memory files, which a sender makes its files on
    (§3.1: ``memfd_create``): no ``ctypes``, no ``struct statfs`` layout."""
    seals = fcntl.fcntl(fd, _F_GET_SEALS)
    need = _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_WRITE
    if seals & need != need:
        raise ProtocolError("malformed frame: a shared attachment is not sealed")
    if st.st_dev != _memory_files_device():
        raise ProtocolError(
            "malformed frame: a shared attachment is not a memory file of tmpfs "
            "(a huge-page memory file?)")


def _top_level_once(seen):
    """A JSON object hook that notes, in ``seen``, whether each object had
    a key twice; the document's own object is the last one built."""
    def pairs(items):
        built = dict(items)
        seen.append(len(built) != len(items))
        return built
    return pairs


def shared_indices(header):
    """The indices a header's ``shm`` field names (none without the field),
    as the Rust reader's ``shared_indices`` finds them. Most headers have
    no such field and are not parsed for it; but a key spelled with escapes
    (``"\\u0073hm"``) is the same key to a JSON parser (the host's), so a
    header with an escape that can spell one of its letters (``\\u006.``,
    ``\\u007.``) is parsed too: else its descriptors would pair with the
    next frame's attachments. A field that is not a list (``null``
    included), or a header that names a field twice (PROTOCOL.md §5: which
    ``shm`` would count?), is malformed, as there."""
    if b'"shm"' not in header and b"\\u006" not in header and b"\\u007" not in header:
        return []
    seen = []
    message = header_object(header, _top_level_once(seen))
    if seen[-1]:
        raise ProtocolError("malformed request: a field of the header appears twice")
    indices = message.get("shm", [])
    if not isinstance(indices, list):
        raise ProtocolError("malformed frame: bad 'shm' field %r" % (indices,))
    return indices


def _with_shm_field(header, indices):
    field = ('"shm":[%s],' % ",".join(str(i) for i in indices)).encode("ascii")
    return header[:1] + field + header[1:]


class Wire(object):
    """The private protocol descriptors: frames in, frames out (whole,
    under one lock); with ``shm`` (socket, threshold), large attachments
    through shared memory."""

    def __init__(self, fd_in, fd_out, shm=None):
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.lock = threading.Lock()
        self.shm = shm
        # The request and answer streams as found: (number, identity), in
        # this process (a child the plugin forks has them on /dev/null).
        # Not the shared-memory socket: closed alone, the next large
        # attachment fails (exit 65), and a stop after that is still a stop.
        self._channel = [(fd, _identity(fd)) for fd in (fd_in, fd_out)]
        self._pid = os.getpid()
        # Buffered: a small request (prefix and body) is one read(2).
        self._in = open(fd_in, "rb", buffering=1 << 16, closefd=False)

    def channel_closed(self):
        """Whether plugin code closed one of the protocol's descriptors, or
        put another file in its place (a daemon's ``closerange`` and
        ``open("/dev/null")``): the host then hears nothing more from this
        runner, and ``EXIT_CHANNEL`` says why. Never in a child the plugin
        forked; not known (False) when even the check fails (out of
        memory: the caller must still end the process)."""
        try:
            if os.getpid() != self._pid:
                return False
            closed = any(_identity(fd) != identity for fd, identity in self._channel)
        except BaseException:
            return False
        if closed:
            diag("its protocol descriptors were closed or replaced from inside the process")
        return closed

    def exit_code(self, otherwise):
        """The exit code when the stream with the host ended or broke:
        ``EXIT_CHANNEL`` when :meth:`channel_closed`, else ``otherwise``."""
        return EXIT_CHANNEL if self.channel_closed() else otherwise

    # -- reading --------------------------------------------------------

    def _read_into(self, view):
        """Fills ``view``; returns the number of bytes read (fewer only at
        the end of the stream)."""
        got = 0
        total = len(view)
        while got < total:
            n = self._in.readinto(view[got:])
            if not n:
                break
            got += n
        return got

    def read_frame(self):
        """One request frame as (header bytes, [attachment bytes]), or None
        at a clean end of stream. Raises ProtocolError."""
        # A buffered read returns short only at the end of the stream.
        prefix = self._in.read(4)
        if not prefix:
            return None
        if len(prefix) < 4:
            raise ProtocolError("broken stream: the stream ended inside a frame's length")
        (length,) = _U32.unpack(prefix)
        if length > MAX_REQUEST_BYTES:
            raise ProtocolError(
                "a frame of %d bytes exceeds the limit of %d bytes" % (length, MAX_REQUEST_BYTES)
            )
        body = self._read_body(length)
        header, attachments = split_body(body)
        indices = shared_indices(header)
        if indices:
            self._receive_shared(indices, attachments)
        return header, attachments

    def _receive_shared(self, indices, attachments):
        """Replaces the shared attachments ``indices`` names (the header's
        ``shm``) by their mappings; their descriptors were sent before the
        frame."""
        import _socket as socket  # see shm_socket
        if self.shm is None:
            raise ProtocolError("malformed frame: shared attachments, but no shared memory was offered")
        if (len(indices) > SHM_MAX_PER_FRAME
                or not all(type(i) is int and 0 <= i < len(attachments) for i in indices)
                or any(a >= b for a, b in zip(indices, indices[1:]))):
            raise ProtocolError("malformed frame: bad 'shm' indices %r" % (indices,))
        fd_size = struct.calcsize("i")
        try:
            data, ancdata, flags, _ = self.shm[0].recvmsg(
                4, socket.CMSG_SPACE(SHM_MAX_PER_FRAME * fd_size),
                socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            raise ProtocolError("malformed frame: shared attachments whose descriptors did not come first")
        except OSError as e:
            raise ProtocolError("broken stream: the shared-memory socket: %s" % e)
        fds = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % fd_size
                fds.extend(struct.unpack("%di" % (usable // fd_size), payload[:usable]))
        try:
            if flags & socket.MSG_CTRUNC and len(fds) < len(indices):
                # The kernel drops descriptors a process has no room for.
                import resource

                raise ProtocolError(
                    "%d shared attachments announced, %d descriptors came: this runner is out of "
                    "file descriptors (its limit is %d; does the plugin leak them?)"
                    % (len(indices), len(fds), resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != len(indices) \
                    or data != struct.pack("<I", len(indices)):
                raise ProtocolError("malformed frame: %d shared attachments announced, %d descriptors came"
                                    % (len(indices), len(fds)))
            for i, fd in zip(indices, fds):
                if len(attachments[i]):
                    raise ProtocolError("malformed frame: shared attachment %d also has bytes in the frame" % i)
                st = os.fstat(fd)
                _check_shared_file(fd, st)
                size = st.st_size
                if size == 0:
                    attachments[i] = b""
                else:
                    # The descriptor is the attachment's now: it closes it.
                    attachments[i] = Shared(fd, size)
                    fds[fds.index(fd)] = -1
        except OSError as e:
            raise ProtocolError("malformed frame: a shared attachment: %s" % e)
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def _read_body(self, length):
        if length <= SMALL_FRAME_BYTES:
            # The common request: one read, from the buffer.
            body = self._in.read(length)
            if len(body) == length:
                return body
        else:
            try:
                body = bytearray(min(length, READ_PREALLOCATE))
                filled = 0
                while True:
                    filled += self._read_into(memoryview(body)[filled:])
                    if filled == length:
                        return body
                    if filled < len(body):
                        break  # the stream ended
                    body.extend(bytes(min(length, 2 * len(body)) - len(body)))
            except MemoryError:
                # As the native runner: a frame that cannot be held ends the
                # stream (exit 65), whatever the memory limit.
                raise ProtocolError("broken stream: cannot allocate %d bytes for a frame" % length)
        raise ProtocolError("broken stream: the stream ended inside a %d-byte frame" % length)

    # -- writing --------------------------------------------------------

    def _write_all(self, data):
        written = os.write(self.fd_out, data)
        if written == len(data):
            return
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(self.fd_out, view):]

    def _share(self, header, attachments):
        """(header, attachments, descriptors) with the attachments at or
        above the threshold in sealed memory files (best effort: one that
        cannot be made stays inline)."""
        if self.shm is None or not attachments:
            return header, attachments, []
        threshold = self.shm[1]
        indices, fds = [], []
        attachments = list(attachments)
        try:
            for i, data in enumerate(attachments):
                if len(fds) == SHM_MAX_PER_FRAME:
                    break
                if len(data) == 0 or len(data) < threshold:
                    continue
                try:
                    fds.append(_sealed(data))
                except (OSError, AttributeError, ValueError, TypeError):
                    continue
                indices.append(i)
                attachments[i] = b""
        except BaseException:
            # (A MemoryError, say.) The files made so far are closed, not
            # kept open with their bytes until the runner exits.
            for fd in fds:
                os.close(fd)
            raise
        if not fds:
            return header, attachments, []
        return _with_shm_field(header, indices), attachments, fds

    def shm_field_size(self, attachments):
        """The most bytes ``_share`` adds to a header carrying
        ``attachments`` (its ``shm`` field): what the host counts in the
        frame's size, as it counts the shared attachments' bytes."""
        if self.shm is None:
            return 0
        threshold = self.shm[1]
        indices = [i for i, data in enumerate(attachments)
                   if len(data) != 0 and len(data) >= threshold][:SHM_MAX_PER_FRAME]
        return len(_with_shm_field(b"{}", indices)) - 2 if indices else 0

    def send_frame(self, header, attachments=()):
        if not attachments:
            # The common answer: prefix and header in one write, without
            # the shared-memory path (measured: a tenth of a no-op call).
            data = _FRAME_HEAD.pack(8 + len(header), len(header), 0) + header
            with self.lock:
                try:
                    self._write_all(data)
                except OSError:
                    # The host stopped reading: nobody is left to serve.
                    exit_now(self.exit_code(0))
            return
        plain = (header, attachments)
        header, attachments, fds = self._share(header, attachments)
        try:
            self._send_frame(header, attachments, fds, plain)
        finally:
            for fd in fds:
                os.close(fd)

    def _send_frame(self, header, attachments, fds, plain):
        with self.lock:
            if fds:
                import _socket as socket  # see shm_socket

                try:
                    self.shm[0].sendmsg(
                        [struct.pack("<I", len(fds))],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))],
                        socket.MSG_DONTWAIT)
                except OSError:
                    header, attachments = plain  # it all goes inline
                # The runner keeps no copy once they are sent (or not).
                while fds:
                    os.close(fds.pop())
            sizes = [len(a) for a in attachments]
            total = 8 + 4 * len(sizes) + len(header) + sum(sizes)
            prefix = struct.pack("<III%dI" % len(sizes), total, len(header), len(sizes), *sizes)
            try:
                self._write_all(prefix + header)
                for attachment in attachments:
                    self._write_all(attachment)
            except OSError:
                exit_now(self.exit_code(0))  # as above


def frame_size(header, attachments):
    return 8 + 4 * len(attachments) + len(header) + sum(len(a) for a in attachments)


def split_body(body):
    """Splits a frame body per the consistency rule (PROTOCOL.md §2)."""
    n = len(body)
    if n < 8:
        raise ProtocolError("malformed frame: a frame body of %d bytes has no header" % n)
    header_len, count = _FRAME_TABLE.unpack_from(body, 0)
    if count == 0 and 8 + header_len == n:
        return bytes(body[8:]), []
    table_end = 8 + 4 * count
    if table_end > n:
        raise ProtocolError(
            "malformed frame: %d attachments announced in a frame body of %d bytes" % (count, n)
        )
    if count > MAX_ATTACHMENTS:
        # PROTOCOL.md §2, as the Rust reader: a table of that many parts
        # would hold several times the frame's size.
        raise ProtocolError(
            "malformed frame: %d attachments in one frame (at most %d)" % (count, MAX_ATTACHMENTS)
        )
    sizes = struct.unpack_from("<%dI" % count, body, 8) if count else ()
    at = table_end + header_len
    end = at + sum(sizes)
    if end != n:
        raise ProtocolError(
            "malformed frame: the frame's parts add up to %d bytes, its body holds %d" % (end, n)
        )
    view = memoryview(body)
    header = bytes(view[table_end:at])
    attachments = []
    for size in sizes:
        attachments.append(bytes(view[at:at + size]))
        at += size
    return header, attachments


# `json.dumps` with these arguments makes an encoder per call.
_JSON_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
# Taken before any plugin code runs: a plugin that replaces `json.loads`
# or `json.JSONDecoder` (with a faster library's, say) does not change how
# requests are read (it made every request "malformed: no 'op'").
_JSON_DECODER = json.JSONDecoder
_JSON_DECODE = _JSON_DECODER().decode


def encode(message):
    """A message's JSON header bytes. Raises ValueError (NaN and the like)
    or UnicodeEncodeError (lone surrogates)."""
    return _JSON_ENCODE(message).encode("utf-8")


_STR_OR_NONE = (str, type(None))


def header_object(header, object_pairs_hook=None):
    """A frame header as the JSON object it must be; ProtocolError if it is
    not one. ``object_pairs_hook``: ``json.loads``'s."""
    try:
        text = header.decode("utf-8")
        if object_pairs_hook is None:
            message = _JSON_DECODE(text)
        else:
            message = _JSON_DECODER(object_pairs_hook=object_pairs_hook).decode(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("malformed request: %s" % e)
    if not isinstance(message, dict):
        raise ProtocolError("malformed request: the header is not a JSON object")
    return message


def parse_request(header):
    """The request in a frame header, checked like the host's envelope
    (``message.rs``): ``op``, ``id`` and the fields of the op."""
    message = header_object(header)
    op = message.get("op")
    if not isinstance(op, str):
        raise ProtocolError("malformed request: no 'op'")
    rid = message.get("id")
    if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid < (1 << 64):
        raise ProtocolError("malformed request: 'id' is not an unsigned 64-bit integer")
    if op == "create":
        # A present ``null`` is a payload, not a missing field (the host's
        # ``message.rs``): ``create`` answers a config that is no object.
        if "config" not in message:
            raise ProtocolError("malformed request: 'create' needs 'config'")
    elif op == "call":
        if not isinstance(message.get("tool"), str):
            raise ProtocolError("malformed request: 'call' needs 'tool'")
        # ``args`` is any JSON (PROTOCOL.md), ``null`` included.
        if "args" not in message:
            raise ProtocolError("malformed request: 'call' needs 'args'")
        pointers = message.get("attachments", [])
        if not isinstance(pointers, list) or not all(isinstance(p, str) for p in pointers):
            raise ProtocolError("malformed request: 'attachments' is not a list of strings")
        context = message.get("context")
        if context is not None and not (
                isinstance(context, dict)
                and isinstance(context.get("request_id"), _STR_OR_NONE)
                and isinstance(context.get("traceparent"), _STR_OR_NONE)):
            raise ProtocolError("malformed request: 'context' is not an object of strings")
    else:
        raise ProtocolError("malformed request: unknown op %r" % op)
    return message
