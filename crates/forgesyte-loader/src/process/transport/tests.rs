use super::*;
use forgesyte_protocol::wire::{Hello, PROTOCOL_VERSION, Request, write_frame};
use serde_json::value::RawValue;
use std::io::{PipeReader, PipeWriter, pipe};
use std::thread;

const LONG: Duration = Duration::from_secs(10);

fn hello() -> Vec<u8> {
    serde_json::to_vec(&Response::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        runtime: "test".into(),
        runtime_version: "1".into(),
        pid: 1,
        capabilities: vec![],
        confinement: None,
        stack_signal: None,
    }))
    .unwrap()
}

/// A transport whose runner is `runner(requests, answers)` on a thread,
/// and whose reader runs on another; returns the transport and what the
/// reader ended with.
fn connect(
    runner: impl FnOnce(PipeReader, PipeWriter) + Send + 'static,
) -> (
    Arc<Transport>,
    Receiver<Reply>,
    thread::JoinHandle<Option<String>>,
) {
    let (req_r, req_w) = pipe().unwrap();
    let (ans_r, ans_w) = pipe().unwrap();
    thread::spawn(move || runner(req_r, ans_w));
    let (transport, greeting) = Transport::new(req_w, 1 << 20).unwrap();
    let transport = Arc::new(transport);
    let t = Arc::clone(&transport);
    let reader = thread::spawn(move || {
        let end = t.read_answers(ans_r);
        t.fail_all(&Arc::new(ExitReport::protocol("ended")));
        end
    });
    (transport, greeting, reader)
}

/// A call of tool `x`, no arguments, as request `id`'s header.
fn call_x(id: u64) -> Vec<u8> {
    format!(r#"{{"op":"call","id":{id},"tool":"x","args":{{}}}}"#).into_bytes()
}

/// A transport to a runner that greets, then never reads its requests nor
/// answers, greeted already; and its reader thread.
fn silent() -> (Arc<Transport>, thread::JoinHandle<Option<String>>) {
    let (t, greeting, reader) = connect(|requests, mut answers| {
        write_frame(&mut answers, &hello(), &[]).unwrap();
        let _keep = requests; // never read
        thread::sleep(LONG);
    });
    assert!(greeting.recv_timeout(LONG).is_ok());
    (t, reader)
}

/// A runner that greets, then answers each call with its args, in
/// reverse order of every two requests (to check routing by id).
fn echo_runner(mut requests: PipeReader, mut answers: PipeWriter) {
    write_frame(&mut answers, &hello(), &[]).unwrap();
    let mut pending = Vec::new();
    while let Ok(frame) = read_frame(&mut requests, 1 << 20) {
        let request: Request = serde_json::from_slice(frame.header()).unwrap();
        let Request::Call { id, args, .. } = request else {
            panic!("not a call")
        };
        let atts: Vec<Vec<u8>> = frame.attachments().map(<[u8]>::to_vec).collect();
        pending.push((id, args, atts));
        if pending.len() == 2 {
            for (id, args, atts) in pending.drain(..).rev() {
                let header = serde_json::to_vec(&Response::Result {
                    id,
                    result: args,
                    attachments: (0..atts.len()).map(|i| format!("/{i}")).collect(),
                })
                .unwrap();
                let refs: Vec<&[u8]> = atts.iter().map(Vec::as_slice).collect();
                write_frame(&mut answers, &header, &refs).unwrap();
            }
        }
    }
}

fn call(t: &Transport, args: &str, atts: &[&[u8]]) -> Result<Reply, RequestError> {
    t.request(
        |id| format!(r#"{{"op":"call","id":{id},"tool":"echo","args":"#).into_bytes(),
        &[args.as_bytes(), b"}"],
        atts,
        LONG,
    )
}

#[test]
fn answers_reach_their_callers_whatever_their_order() {
    let (t, greeting, reader) = connect(echo_runner);
    assert!(matches!(
        greeting.recv_timeout(LONG),
        Ok(Reply::Greeting(Ok(Greeting::Hello(_))))
    ));
    let callers: Vec<_> = (0..4)
        .map(|i| {
            let t = Arc::clone(&t);
            thread::spawn(move || {
                let payload = vec![i as u8; 1000 * i];
                match call(&t, &format!("[{i}]"), &[&payload]) {
                    Ok(Reply::Answer(Response::Result { result, .. }, frame)) => (
                        result.get().to_owned(),
                        frame.attachment(0).map(<[u8]>::to_vec),
                    ),
                    other => panic!("{other:?}"),
                }
            })
        })
        .collect();
    for (i, caller) in callers.into_iter().enumerate() {
        let (result, att) = caller.join().unwrap();
        assert_eq!(result, format!("[{i}]"));
        assert_eq!(att, Some(vec![i as u8; 1000 * i]));
    }
    t.close_writer();
    assert_eq!(reader.join().unwrap(), None, "a clean end");
    assert!(matches!(
        call(&t, "{}", &[]),
        Err(RequestError::Closed(Some(_)))
    ));
}

/// A shared-memory socket pair: the host's end, the runner's.
fn shm_pair() -> (OwnedFd, OwnedFd) {
    crate::process::seqpacket_pair().unwrap()
}

#[test]
fn shared_attachments_go_both_ways_once_the_hello_accepts_them() {
    use forgesyte_protocol::wire::capability;
    let (host_end, runner_end) = shm_pair();
    let (mut req_r, req_w) = pipe().unwrap();
    let (ans_r, mut ans_w) = pipe().unwrap();
    let runner = thread::spawn(move || {
        let hello = serde_json::to_vec(&Response::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            runtime: "test".into(),
            runtime_version: "1".into(),
            pid: 1,
            capabilities: vec![
                capability::ATTACHMENTS.into(),
                capability::SHARED_MEMORY.into(),
            ],
            confinement: None,
            stack_signal: None,
        }))
        .unwrap();
        write_frame(&mut ans_w, &hello, &[]).unwrap();
        // The request's attachment came shared; it goes back shared.
        let mut frame = read_frame(&mut req_r, 1 << 30).unwrap();
        shm::receive(&mut frame, Some(runner_end.as_fd()), 1 << 30).unwrap();
        let came_shared = frame.is_shared(0);
        let Ok(Request::Call { id, .. }) = serde_json::from_slice(frame.header()) else {
            panic!("not a call")
        };
        let atts: Vec<&[u8]> = frame.attachments().collect();
        let out = Outgoing::prepare(&atts, 1);
        let header = serde_json::to_vec(&Response::Result {
            id,
            result: RawValue::from_string("[null]".into()).unwrap(),
            attachments: vec!["/0".into()],
        })
        .unwrap();
        out.send(runner_end.as_fd()).unwrap();
        write_frame(&mut ans_w, &out.header(&header), &out.inline(&atts)).unwrap();
        // Then an answer that announces a shared attachment it never sent.
        let frame = read_frame(&mut req_r, 1 << 30).unwrap();
        let Ok(Request::Call { id, .. }) = serde_json::from_slice(frame.header()) else {
            panic!("not a call")
        };
        let lie = format!(
            r#"{{"shm":[0],"type":"result","id":{id},"result":[null],"attachments":["/0"]}}"#
        );
        write_frame(&mut ans_w, lie.as_bytes(), &[b""]).unwrap();
        came_shared
    });
    let (mut transport, greeting) = Transport::new(req_w, 1 << 30).unwrap();
    transport.offer_shm(host_end, 1000);
    let t = Arc::new(transport);
    let reader = {
        let t = Arc::clone(&t);
        thread::spawn(move || {
            let end = t.read_answers(ans_r);
            t.fail_all(&Arc::new(ExitReport::protocol("ended")));
            end
        })
    };
    assert!(greeting.recv_timeout(LONG).is_ok());
    assert!(t.uses_shm());
    let big: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
    match call(&t, "{}", &[&big]) {
        Ok(Reply::Answer(Response::Result { .. }, frame)) => {
            assert!(frame.is_shared(0));
            assert_eq!(frame.attachment(0), Some(&big[..]));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(call(&t, "{}", &[]), Ok(Reply::Died(_))));
    let end = reader.join().unwrap().unwrap_or_default();
    // No descriptor message (or, the runner gone, none left to come).
    assert!(end.contains("shared attachments announced"), "{end}");
    assert!(
        runner.join().unwrap(),
        "the request's attachment was not shared"
    );
}

/// A runner that dies between sending descriptors and the frame that
/// would use them leaves them queued on the host's end of the socket:
/// the end of its answers closes them (a pipe's end here, whose reader
/// then sees its end), and takes no more.
#[test]
fn what_a_dead_runner_left_on_the_shared_memory_socket_is_closed() {
    let (host_end, runner_end) = shm_pair();
    let (_req_r, req_w) = pipe().unwrap();
    let (ans_r, mut ans_w) = pipe().unwrap();
    let (stranded_r, stranded_w) = pipe().unwrap();
    write_frame(&mut ans_w, &hello(), &[]).unwrap();
    let stranded: OwnedFd = stranded_w.into();
    // An empty message first: draining the queue would stop there.
    rustix::net::sendmsg(
        &runner_end,
        &[],
        &mut rustix::net::SendAncillaryBuffer::default(),
        rustix::net::SendFlags::empty(),
    )
    .unwrap();
    let count = 1u32.to_le_bytes();
    let fds = [stranded.as_fd()];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
    rustix::net::sendmsg(
        &runner_end,
        &[std::io::IoSlice::new(&count)],
        &mut control,
        rustix::net::SendFlags::empty(),
    )
    .unwrap();
    drop((stranded, ans_w));
    let (mut transport, _greeting) = Transport::new(req_w, 1 << 30).unwrap();
    transport.offer_shm(host_end, 1000);
    assert_eq!(transport.read_answers(ans_r), None);
    // Without waiting: a pipe end still open somewhere would block.
    rustix::io::ioctl_fionbio(&stranded_r, true).unwrap();
    let mut end = [0u8; 1];
    assert_eq!(
        (&stranded_r).read(&mut end).map_err(|e| e.kind()),
        Ok(0),
        "still open"
    );
    let late = rustix::net::sendmsg(
        &runner_end,
        &[std::io::IoSlice::new(&count)],
        &mut rustix::net::SendAncillaryBuffer::default(),
        rustix::net::SendFlags::NOSIGNAL,
    );
    assert!(late.is_err(), "the socket still takes messages");
}

#[test]
fn a_runner_of_another_version_is_named_not_garbage() {
    let (_t, greeting, reader) = connect(|_, mut answers| {
        // A version-1 hello: a length and bare JSON.
        let body = br#"{"type":"hello","abi_version":1,"pid":3}"#;
        answers
            .write_all(&(body.len() as u32).to_le_bytes())
            .unwrap();
        answers.write_all(body).unwrap();
    });
    assert!(matches!(
        greeting.recv_timeout(LONG),
        Ok(Reply::Greeting(Err(HandshakeError::Version {
            host: 2,
            runner: 1
        })))
    ));
    assert!(reader.join().unwrap().unwrap().contains("version 1"));
}

#[test]
fn violations_end_the_connection_and_fail_waiters() {
    // An answer to an id never asked for.
    let (t, _greeting, reader) = connect(|mut requests, mut answers| {
        write_frame(&mut answers, &hello(), &[]).unwrap();
        let _ = read_frame(&mut requests, 1 << 20);
        let bogus = serde_json::to_vec(&Response::Result {
            id: 999,
            result: RawValue::from_string("1".into()).unwrap(),
            attachments: vec![],
        })
        .unwrap();
        write_frame(&mut answers, &bogus, &[]).unwrap();
        thread::sleep(LONG);
    });
    assert!(matches!(call(&t, "{}", &[]), Ok(Reply::Died(_))));
    assert!(
        reader
            .join()
            .unwrap()
            .unwrap()
            .contains("unknown request id 999")
    );
    // Garbage after the greeting; an oversized frame.
    for (bytes, expected) in [
        (b"\x05\x00\x00\x00hello".to_vec(), "malformed"),
        ((u32::MAX).to_le_bytes().to_vec(), "exceeds the limit"),
    ] {
        let (_t, _g, reader) = connect(move |_, mut answers| {
            write_frame(&mut answers, &hello(), &[]).unwrap();
            answers.write_all(&bytes).unwrap();
        });
        let end = reader.join().unwrap().unwrap();
        assert!(end.contains(expected), "{end}");
    }
    // A whole frame whose header is no object: said so (it read "invalid
    // type: integer `1`, expected a string").
    let (_t, _g, reader) = connect(move |_, mut answers| {
        write_frame(&mut answers, &hello(), &[]).unwrap();
        write_frame(&mut answers, b"[1,2,3]", &[]).unwrap();
    });
    assert_eq!(
        reader.join().unwrap().as_deref(),
        Some("malformed answer: its header is not a JSON object")
    );
}

/// A small call request to `echo` with `args`, tried at once.
fn send(t: &Transport, args: &str) -> TrySend {
    t.try_send(
        |id| format!(r#"{{"op":"call","id":{id},"tool":"echo","args":"#).into_bytes(),
        &[args.as_bytes(), b"}"],
    )
}

fn sent(t: &Transport, args: &str) -> Sent {
    match send(t, args) {
        TrySend::Sent(sent) => sent,
        other => panic!("{args}: {other:?}"),
    }
}

fn result_of(reply: Result<Reply, RequestError>) -> String {
    match reply {
        Ok(Reply::Answer(Response::Result { result, .. }, _)) => result.get().to_owned(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn awaited_requests_get_their_answers_and_big_ones_are_left_to_request() {
    let (t, greeting, reader) = connect(echo_runner);
    assert!(greeting.recv_timeout(LONG).is_ok());
    let deadline = Instant::now().checked_add(LONG);
    let first = sent(&t, "[1]");
    // A frame over a pipe's atomic write is not sent this way: nothing
    // of it reaches the runner, which would pair it with `[1]`. Its
    // arguments alone, or with the rest of the frame.
    for len in [ATOMIC_FRAME, ATOMIC_FRAME - 20] {
        let big = format!("[\"{}\"]", "x".repeat(len));
        assert!(matches!(send(&t, &big), TrySend::TooLarge), "{len}");
    }
    assert_eq!(t.waiters.lock().map.len(), 1);
    let second = sent(&t, "[2]");
    // Answered in reverse order, each reaches its own task.
    let (a, b) = tokio::join!(t.wait(second, deadline), t.wait(first, deadline));
    assert_eq!((result_of(a), result_of(b)), ("[2]".into(), "[1]".into()));
    // Awaited and blocked callers share the connection.
    let blocked = {
        let t = Arc::clone(&t);
        thread::spawn(move || result_of(call(&t, "[3]", &[])))
    };
    while t.waiters.lock().map.is_empty() {
        tokio::task::yield_now().await;
    }
    // The blocked caller may still hold the writer (a loaded machine):
    // `Busy` then, and sent again, as a request's task does.
    let fourth = loop {
        match send(&t, "[4]") {
            TrySend::Sent(sent) => break sent,
            TrySend::Busy if deadline.is_some_and(|d| Instant::now() < d) => {
                tokio::task::yield_now().await;
            }
            other => panic!("[4]: {other:?}"),
        }
    };
    assert_eq!(result_of(t.wait(fourth, deadline).await), "[4]");
    assert_eq!(blocked.join().unwrap(), "[3]");
    t.close_writer();
    assert_eq!(reader.join().unwrap(), None, "a clean end");
    assert!(matches!(send(&t, "{}"), TrySend::Closed(Some(_))));
}

#[tokio::test]
async fn an_awaited_request_sends_nothing_without_room_and_times_out_forgotten() {
    let (go, started) = std::sync::mpsc::channel::<usize>();
    let (t, greeting, _reader) = connect(move |mut requests, mut answers| {
        write_frame(&mut answers, &hello(), &[]).unwrap();
        // Reads nothing until told how many requests the pipe took,
        // then answers each (every one a whole frame), then no more.
        let Ok(count) = started.recv() else { return };
        for _ in 0..count {
            let (id, args) = next_call(&mut requests).unwrap();
            answer_with(&mut answers, id, args);
        }
        let _keep = requests;
        thread::sleep(LONG);
    });
    assert!(greeting.recv_timeout(LONG).is_ok());
    // Another caller writing: not sent, nothing registered.
    {
        let _writing = t.writer.lock();
        assert!(matches!(send(&t, "{}"), TrySend::Busy));
    }
    assert!(t.waiters.lock().map.is_empty());
    let mut requests = Vec::new();
    let full = loop {
        match send(&t, &format!("[{}]", requests.len())) {
            TrySend::Sent(sent) => requests.push(sent),
            other => break other,
        }
        assert!(requests.len() < 100_000, "a pipe that never fills");
    };
    // The one that found no room left nothing behind, and the stream
    // is whole (not closed): the runner reads every frame sent, and
    // each answer reaches its request.
    assert!(matches!(full, TrySend::Busy), "{full:?}");
    assert_eq!(t.waiters.lock().map.len(), requests.len());
    assert!(t.writer.lock().is_some());
    go.send(requests.len()).unwrap();
    let deadline = Instant::now().checked_add(LONG);
    for (i, request) in requests.into_iter().enumerate() {
        assert_eq!(result_of(t.wait(request, deadline).await), format!("[{i}]"));
    }
    // Unanswered past its deadline: forgotten.
    let late = sent(&t, "{}");
    let soon = Instant::now().checked_add(Duration::from_millis(50));
    assert!(matches!(
        t.wait(late, soon).await,
        Err(RequestError::TimedOut)
    ));
    assert!(t.waiters.lock().map.is_empty());
}

#[tokio::test]
async fn an_awaited_request_learns_of_its_runner_s_death() {
    let (t, greeting, reader) = connect(|mut requests, mut answers| {
        write_frame(&mut answers, &hello(), &[]).unwrap();
        let _ = read_frame(&mut requests, 1 << 20);
        // Ends without answering.
    });
    assert!(greeting.recv_timeout(LONG).is_ok());
    let request = sent(&t, "{}");
    let reply = t.wait(request, Instant::now().checked_add(LONG)).await;
    assert!(
        matches!(&reply, Ok(Reply::Died(report)) if report.reason.ends_with(": ended")),
        "{reply:?}"
    );
    assert_eq!(reader.join().unwrap(), None);
}

#[test]
fn a_silent_runner_times_out_and_the_waiter_is_forgotten() {
    let (t, _reader) = silent();
    let r = t.request(call_x, &[], &[], Duration::from_millis(50));
    assert!(matches!(r, Err(RequestError::TimedOut)));
    assert!(t.waiters.lock().map.is_empty());
}

#[test]
fn a_runner_that_stops_reading_cannot_hold_a_request_past_its_timeout() {
    // Never reads: the pipe fills up.
    let (t, _reader) = silent();
    // Far bigger than a pipe's buffer. The first caller blocks in its
    // write; the second, with a shorter timeout, waits for the writer
    // lock meanwhile: each comes back after its own timeout.
    let big = vec![7u8; 4 << 20];
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for (which, timeout_ms) in [("writing", 1500), ("queued", 200)] {
        let (t, big, done_tx) = (Arc::clone(&t), big.clone(), done_tx.clone());
        thread::spawn(move || {
            let started = Instant::now();
            let r = t.request(call_x, &[], &[&big], Duration::from_millis(timeout_ms));
            let _ = done_tx.send((which, r, started.elapsed()));
        });
        thread::sleep(Duration::from_millis(100));
    }
    for expected in ["queued", "writing"] {
        let (which, r, took) = done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a request is blocked past its timeout");
        assert_eq!(which, expected);
        assert!(matches!(r, Err(RequestError::TimedOut)), "{which}: {r:?}");
        assert!(took < Duration::from_secs(3), "{which}: {took:?}");
    }
    assert!(t.waiters.lock().map.is_empty());
    // Half a frame went out: the stream is not reused.
    assert!(t.writer.lock().is_none());
}

/// What a runner finds in its request pipe once it reads all there is.
#[derive(Debug, PartialEq)]
enum Drained {
    /// Nothing more for now: the host's end is open.
    Open,
    /// The end of its input.
    End,
}

fn drain(requests: &mut PipeReader) -> Drained {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match requests.read(&mut buf) {
            Ok(0) => return Drained::End,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Open,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_stream_out_of_step_stays_open_until_it_is_closed() {
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let (t, greeting, _reader) = connect(move |mut requests, mut answers| {
        write_frame(&mut answers, &hello(), &[]).unwrap();
        rustix::io::ioctl_fionbio(&requests, true).unwrap();
        // Reads nothing until the request timed out, then all there is,
        // twice: before and after the host closes its end.
        for _ in 0..2 {
            if go_rx.recv().is_err() {
                return;
            }
            let _ = seen_tx.send(drain(&mut requests));
        }
        thread::sleep(LONG);
    });
    assert!(greeting.recv_timeout(LONG).is_ok());
    let big = vec![7u8; 4 << 20];
    let r = t.request(call_x, &[], &[&big], Duration::from_millis(200));
    assert!(matches!(r, Err(RequestError::TimedOut)), "{r:?}");
    // Part of the frame is in the pipe: no request is written after it,
    // and the runner does not read the end of its input (it would exit
    // before the caller kills it for its time-out).
    assert!(t.writer.lock().is_none());
    go_tx.send(()).unwrap();
    assert_eq!(seen_rx.recv_timeout(LONG).unwrap(), Drained::Open);
    let next = t.request(call_x, &[], &[], Duration::from_millis(200));
    assert!(matches!(next, Err(RequestError::Closed(_))), "{next:?}");
    t.close_writer();
    go_tx.send(()).unwrap();
    assert_eq!(seen_rx.recv_timeout(LONG).unwrap(), Drained::End);
}

/// A transport to a runner that greets and never reads, and a thread
/// writing it a 4 MiB request (blocked: the pipe fills up) for at most
/// `timeout`, returned once that request holds the writer.
fn blocked_request(
    timeout: Duration,
) -> (
    Arc<Transport>,
    thread::JoinHandle<Result<Reply, RequestError>>,
) {
    let (t, _reader) = silent();
    let writing = {
        let t = Arc::clone(&t);
        thread::spawn(move || {
            let big = vec![7u8; 4 << 20];
            t.request(call_x, &[], &[&big], timeout)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.held_by_request.load(Ordering::Acquire) {
        assert!(
            Instant::now() < deadline,
            "the request never held the writer"
        );
        thread::yield_now();
    }
    (t, writing)
}

#[test]
fn closing_the_writer_need_not_wait_for_a_blocked_request() {
    let (t, writing) = blocked_request(Duration::from_millis(1500));
    // The blocked write holds the writer: a retire does not wait for it.
    let started = Instant::now();
    assert!(!t.close_writer_within(Duration::from_millis(50)));
    assert!(started.elapsed() < Duration::from_millis(1000));
    // Once the write gave up (its timeout), the writer is free.
    assert!(matches!(
        writing.join().unwrap(),
        Err(RequestError::TimedOut)
    ));
    assert!(t.close_writer_within(Duration::from_secs(1)));
    assert!(t.writer.lock().is_none());
}

#[test]
fn a_close_asked_while_a_request_holds_the_writer_happens_when_it_is_done() {
    let (t, writing) = blocked_request(Duration::from_millis(1500));
    // Asked while the request holds the writer: nothing closed yet, and
    // nothing waited for.
    let started = Instant::now();
    t.close_writer_when_free();
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert!(t.writer.try_lock().is_none(), "the request still writes");
    // The request ends (its timeout) and closes the writer on its way out:
    // no one calls a close again.
    assert!(matches!(
        writing.join().unwrap(),
        Err(RequestError::TimedOut)
    ));
    assert!(t.writer.lock().is_none());
    assert!(t.out_of_step.lock().is_none());
    // Without a request holding it, the close is at once.
    let (free, _reader) = silent();
    free.close_writer_when_free();
    assert!(free.writer.lock().is_none());
}

#[test]
fn an_awaited_request_does_not_wait_on_its_thread_for_a_blocked_caller_s_write() {
    let (t, writing) = blocked_request(Duration::from_secs(3));
    // Each try gives up at once: waiting WRITER_WAIT on the thread for a
    // write that may last until its deadline would take 100 ms at least.
    let tries = 2000;
    let started = Instant::now();
    for _ in 0..tries {
        let sent = t.try_send(call_x, &[]);
        assert!(matches!(sent, TrySend::Busy));
    }
    let took = started.elapsed();
    assert!(took < WRITER_WAIT * tries / 2, "{took:?}");
    assert!(t.waiters.lock().map.len() <= 1, "only the blocked request");
    drop(writing); // it ends at its deadline
}

#[test]
fn byte_counts_read_well() {
    assert_eq!(fmt_bytes(64 * 1024 * 1024), "64 MiB");
    assert_eq!(fmt_bytes(512 * 1024), "512 KiB");
    assert_eq!(fmt_bytes(100), "100 bytes");
}

/// A wait that woke long past its deadline (the host was stopped) gets a
/// moment more for an answer its reader is about to hand on; one that woke
/// on time does not.
#[test]
fn a_wait_that_woke_long_after_its_deadline_gets_a_moment_more() {
    let (tx, rx) = std::sync::mpsc::sync_channel::<u32>(1);
    let long_ago = Instant::now().checked_sub(Duration::from_secs(1));
    let just_now = Some(Instant::now());
    tx.send(7).unwrap();
    assert_eq!(super::after_a_stall(&rx, just_now), None, "on time: final");
    assert_eq!(super::after_a_stall(&rx, long_ago), Some(7));
    // Late, and still nothing after the grace.
    let started = Instant::now();
    assert_eq!(super::after_a_stall(&rx, long_ago), None);
    assert!(started.elapsed() >= super::STALL_GRACE);
    assert_eq!(super::after_a_stall(&rx, None), None);
}

/// The next call a runner reads (its id and args); `None` once the
/// request stream ends.
fn next_call(requests: &mut PipeReader) -> Option<(u64, Box<RawValue>)> {
    let frame = read_frame(requests, 1 << 20).ok()?;
    let request: Request = serde_json::from_slice(frame.header()).unwrap();
    let Request::Call { id, args, .. } = request else {
        panic!("not a call")
    };
    Some((id, args))
}

/// Answers call `id` with `args` as its result.
fn answer_with(answers: &mut PipeWriter, id: u64, args: Box<RawValue>) {
    let header = serde_json::to_vec(&Response::Result {
        id,
        result: args,
        attachments: vec![],
    })
    .unwrap();
    write_frame(answers, &header, &[]).unwrap();
}

/// A runner that greets, then answers each call after as many
/// milliseconds as its args say.
fn delaying_runner(mut requests: PipeReader, mut answers: PipeWriter) {
    write_frame(&mut answers, &hello(), &[]).unwrap();
    while let Some((id, args)) = next_call(&mut requests) {
        let ms: u64 = serde_json::from_str(args.get()).unwrap();
        thread::sleep(Duration::from_millis(ms));
        answer_with(&mut answers, id, args);
    }
}

#[test]
fn a_caller_waits_awake_only_for_a_runner_that_answers_quickly() {
    let (t, greeting, _reader) = connect(delaying_runner);
    assert!(greeting.recv_timeout(LONG).is_ok());
    let answered = |t: &Transport, ms: &str| match call(t, ms, &[]) {
        Ok(Reply::Answer(Response::Result { result, .. }, _)) => result.get() == ms,
        other => panic!("{other:?}"),
    };
    // The first request (a construction) is not waited for awake.
    assert!(!t.answers_quickly.load(Ordering::Relaxed));
    // A quick answer (woken from sleep) makes the next caller spin;
    // whether it came within the spin is timing, so the runner's next
    // answers are waited for until one is seen quick.
    let quick = (0..1000).any(|_| answered(&t, "0") && t.answers_quickly.load(Ordering::Relaxed));
    assert!(
        quick,
        "no answer of a 0 ms call came within {ANSWER_SPIN:?}"
    );
    // A call longer than the spin: the caller spun, then slept, and the
    // next one sleeps at once.
    assert!(answered(&t, "20"));
    assert!(!t.answers_quickly.load(Ordering::Relaxed));
}
