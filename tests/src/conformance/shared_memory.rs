//! The conformance check of shared memory (`PROTOCOL.md` §3.1), apart from
//! the pipe-only checks of the parent module: a runner offered no socket
//! announces no `shared_memory` and refuses a `shm` field; a runner offered
//! one either ignores it (the capability is optional) or announces it, keeps
//! the socket from its plugin's subprocesses (close-on-exec), places shared
//! attachments byte for byte (and its answers' shared ones map back), and
//! refuses an unsealed memory file.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use base64::Engine as _;
use forgesyte_protocol::wire::shm::{self, Outgoing, SHM_FD_ENV, SHM_THRESHOLD_ENV};
use forgesyte_protocol::wire::{self, Frame, capability};
use serde_json::{Value, json};

use super::{Reply, RunnerUnderTest, Session};

/// See the module's documentation.
pub fn check_shared_memory(r: &RunnerUnderTest) {
    // Not offered: not announced, and a `shm` field is a malformed frame.
    let (mut s, capabilities) = Session::start("shared memory (not offered)", r);
    if capabilities.iter().any(|c| c == capability::SHARED_MEMORY) {
        s.fail("the hello announces `shared_memory`, but no shared-memory socket was offered");
    }
    if capabilities.iter().any(|c| c == capability::ATTACHMENTS) {
        s.create(r);
        s.send(
            &json!({"shm": [0], "op": "call", "id": 600, "tool": r.echo_tool,
                    "args": {"data": null}, "attachments": ["/data"]}),
            &[b""],
        );
        s.expect_failure_exit("after a `shm` field without an offered socket");
    }
    drop(s);

    // Offered.
    let (mut s, socket, fd) = offered(r);
    let hello = s.recv("the hello");
    let announced = hello
        .header
        .get("capabilities")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|c| c == capability::SHARED_MEMORY));
    if !announced {
        return; // Optional: the runner goes on without it.
    }
    let pid = s.child.id();
    let flags = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
    let cloexec = flags
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .is_some_and(|f| f & 0o2_000_000 != 0);
    if !cloexec {
        s.fail(format!(
            "the shared-memory socket (fd {fd}) is not close-on-exec in the runner: {flags:?}"
        ));
    }
    s.create(r);
    let big: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 13 % 251) as u8).collect();
    let small = b"\x00\xffsmall";
    let atts: [&[u8]; 2] = [&big, small];
    let out = Outgoing::prepare(&atts, 1024);
    let head = out.header(
        serde_json::to_string(&json!({"op": "call", "id": 601, "tool": r.echo_tool,
                 "args": {"big": null, "small": null}, "attachments": ["/big", "/small"]}))
        .expect("JSON serialises")
        .as_bytes(),
    );
    if let Err(e) = out.send(socket.as_fd()) {
        s.fail(format!("cannot send the descriptors: {e}"));
    }
    s.write(super::encode_frame(&head, &out.inline(&atts)));
    let reply = recv_shared(&mut s, &socket, "the echo of a shared attachment");
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    s.expect_result(&reply, 601, &json!({"big": b64(&big), "small": b64(small)}));
    // An unsealed memory file: the bytes could change under the reader.
    let unsealed = match rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC) {
        Ok(fd) => fd,
        Err(e) => s.fail(format!("memfd_create: {e}")),
    };
    let _ = rustix::io::write(&unsealed, &big[..4096]);
    send_raw(&mut s, &socket, &[unsealed]);
    s.send(
        &json!({"shm": [0], "op": "call", "id": 602, "tool": r.echo_tool,
                "args": {"data": null}, "attachments": ["/data"]}),
        &[b""],
    );
    s.expect_failure_exit("after a shared attachment that is not sealed");
}

/// Starts the runner with a shared-memory socket offered (threshold 1 KiB):
/// the session, the suite's end and the runner's descriptor number.
fn offered(r: &RunnerUnderTest) -> (Session, OwnedFd, i32) {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("a socket pair");
    let fd = theirs.as_raw_fd();
    let s = Session::spawn_with("shared memory (offered)", r, |command: &mut Command| {
        command
            .env(SHM_FD_ENV, fd.to_string())
            .env(SHM_THRESHOLD_ENV, "1024");
        // SAFETY: runs between fork and exec in the child: `fcntl` on a
        // descriptor inherited from the parent (open there until the spawn
        // returns) is async-signal-safe and allocates nothing.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                Ok(())
            });
        }
    });
    drop(theirs);
    (s, ours, fd)
}

/// Sends `fds` as one descriptor message, whatever they are.
fn send_raw(s: &mut Session, socket: &OwnedFd, fds: &[OwnedFd]) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&borrowed));
    let count = (fds.len() as u32).to_le_bytes();
    if let Err(e) = rustix::net::sendmsg(
        socket,
        &[std::io::IoSlice::new(&count)],
        &mut control,
        SendFlags::NOSIGNAL,
    ) {
        s.fail(format!("cannot send descriptors: {e}"));
    }
}

/// [`Session::recv`] for an answer that may share attachments.
fn recv_shared(s: &mut Session, socket: &OwnedFd, what: &str) -> Reply {
    let raw = s.recv_raw(what);
    let mut frame = match Frame::parse(raw[4..].to_vec()) {
        Ok(frame) => frame,
        Err(e) => s.fail(format!("{what}: {e}")),
    };
    if let Err(e) = shm::receive(&mut frame, Some(socket.as_fd()), 1 << 30) {
        s.fail(format!("{what}: {e}"));
    }
    let header: Value = match serde_json::from_slice(frame.header()) {
        Ok(header) => header,
        Err(e) => s.fail(format!("{what}: the header is not JSON: {e}")),
    };
    if let Err(e) = serde_json::from_slice::<wire::Response>(frame.header()) {
        s.fail(format!("{what}: the host's decoder rejects {header}: {e}"));
    }
    Reply {
        header,
        attachments: frame.attachments().map(<[u8]>::to_vec).collect(),
    }
}
