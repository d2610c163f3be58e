//! The real GPU probe, on `cudarc`'s driver API with the driver library
//! (`libcuda.so`) loaded at run time.
//!
//! `cudarc` panics when it is asked to load a driver library that is not
//! there, so the probe asks [`cudarc::driver::sys::is_culib_present`] first
//! and runs everything under `catch_unwind`: on a machine without CUDA the
//! answer is a report that says so, never a panic. A driver whose
//! initialisation hangs (a known failure of broken drivers) cannot hold up
//! the load pass either: the probe runs on a thread of its own, and after
//! [`PROBE_TIMEOUT`] the answer is "no GPU", cached like any other.
//!
//! A server probes in a child process ([`CudaProbe::in_child`]): the
//! driver library, its constructors and its threads never enter the
//! server, a driver that crashes (a segfault in `cuInit`, or an error code
//! newer than `cudarc`'s enum, which is undefined behaviour in Rust) ends
//! that child only, and one that hangs is killed with it. The child runs
//! [`probe_here`] and prints its report as JSON.
#![allow(unsafe_code)]

use std::ffi::OsString;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{result, sys};

use crate::gpu::{GpuDevice, GpuProbe, GpuReport};

/// How long the probe may take before its answer is "no GPU" (its thread
/// is left to finish or hang: a thread in a driver call cannot be stopped).
pub(crate) const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// How long a probe child may take before it is killed: far longer than
/// the first wait ([`PROBE_TIMEOUT`]), so that a driver slow to start
/// (many GPUs, persistence mode off) is seen by a later check, as an
/// in-process probe's late answer is.
const CHILD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The most devices probed (a broken driver may count billions).
const MAX_DEVICES: std::ffi::c_int = 64;

/// Reason given when the driver library cannot be loaded.
const NO_DRIVER: &str = "CUDA driver library (libcuda.so) not found";

/// The real GPU probe. The machine is probed once per process, on first
/// use; every later call answers from that result.
#[derive(Debug, Clone, Default)]
pub struct CudaProbe {
    /// The command that probes in a child process; `None`: in this one.
    child: Option<Arc<(PathBuf, Vec<OsString>)>>,
}

impl CudaProbe {
    /// A probe in this process; nothing is loaded until the first
    /// [`report`](Self::report).
    pub fn new() -> Self {
        CudaProbe::default()
    }

    /// A probe that runs `program` with `args` (which must run
    /// [`probe_here`] and print its report as JSON, and nothing else, on
    /// stdout): killed with its process group after two minutes (a slow
    /// driver's answer, past the load pass's first 15 s wait, is still
    /// taken by a later check), and when the thread that started it ends.
    pub fn in_child(program: impl Into<PathBuf>, args: Vec<OsString>) -> Self {
        CudaProbe {
            child: Some(Arc::new((program.into(), args))),
        }
    }

    /// The machine's GPUs, probed on first call and cached for the process
    /// (a probe that gave no answer in time answers "no GPU" until its
    /// answer comes: see `Probing`). The first probe of the process says
    /// where it runs.
    pub fn report(&self) -> &'static GpuReport {
        static PROBING: Probing = Probing::new();
        match &self.child {
            None => PROBING.report(PROBE_TIMEOUT, probe_guarded),
            Some(command) => {
                let command = Arc::clone(command);
                PROBING.report(PROBE_TIMEOUT, move || {
                    let report = probe_in_child(&command.0, &command.1, CHILD_TIMEOUT);
                    log_report(&report);
                    report
                })
            }
        }
    }
}

/// A library search path without its `stubs` directories (the CUDA
/// toolkit's link-time stubs, not drivers).
fn without_stubs(path: &std::ffi::OsStr) -> OsString {
    let kept: Vec<PathBuf> = std::env::split_paths(path)
        .filter(|dir| dir.file_name().is_none_or(|name| name != "stubs"))
        .collect();
    std::env::join_paths(kept).unwrap_or_else(|_| path.to_owned())
}

/// The probe of this process, as a child process runs it for its parent
/// ([`CudaProbe::in_child`]): never panics.
pub fn probe_here() -> GpuReport {
    probe_guarded()
}

/// Runs the probe command `program args` and reads its report; a child
/// that crashes, hangs past `timeout` or prints no report is "no GPU",
/// saying which. The toolkit's stub driver (`…/stubs/libcuda.so`, which
/// answers every call "stub library") is taken off its `LD_LIBRARY_PATH`:
/// on a GPU node where it is on the path, `cudarc` (which tries
/// `libcuda.so` before `libcuda.so.1`) would find it first.
pub(crate) fn probe_in_child(
    program: &std::path::Path,
    args: &[OsString],
    timeout: std::time::Duration,
) -> GpuReport {
    let mut command = std::process::Command::new(program);
    command.args(args);
    crate::die_with_parent_thread(&mut command);
    if let Some(path) = std::env::var_os("LD_LIBRARY_PATH") {
        command.env("LD_LIBRARY_PATH", without_stubs(&path));
    }
    match crate::python::run_captured(command, "the CUDA probe", timeout) {
        Ok(out) => serde_json::from_slice::<GpuReport>(&out).unwrap_or_else(|e| {
            GpuReport::unavailable(format!("the CUDA probe answered no report: {e}"))
        }),
        Err(why) => GpuReport::unavailable(format!("CUDA probe failed: {why}")),
    }
}
impl GpuProbe for CudaProbe {
    fn probe(&self) -> GpuReport {
        self.report().clone()
    }
}

/// Whether the CUDA driver library can be loaded on this machine (it is
/// opened and closed again; no CUDA function is called).
pub fn cuda_driver_library_present() -> bool {
    panic::catch_unwind(|| {
        // SAFETY: `is_culib_present` only tries `dlopen` on the driver
        // library's candidate names and drops what it opened; it reads or
        // writes no memory of ours.
        unsafe { sys::is_culib_present() }
    })
    .unwrap_or(false)
}

/// The machine's one probe, run on a thread of its own: its answer once it
/// came; until then (after a first wait of `limit`), a "no GPU" report
/// saying it gave none, without waiting again. A slow driver (many GPUs,
/// persistence mode off) is seen at the next check after it answered.
struct Probing {
    answer: OnceLock<GpuReport>,
    pending: parking_lot::Mutex<Option<std::sync::mpsc::Receiver<GpuReport>>>,
    no_answer: OnceLock<GpuReport>,
}

impl Probing {
    const fn new() -> Probing {
        Probing {
            answer: OnceLock::new(),
            pending: parking_lot::Mutex::new(None),
            no_answer: OnceLock::new(),
        }
    }

    fn report(
        &'static self,
        limit: std::time::Duration,
        probe: impl FnOnce() -> GpuReport + Send + 'static,
    ) -> &'static GpuReport {
        use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
        if let Some(answer) = self.answer.get() {
            return answer;
        }
        let mut pending = self.pending.lock();
        if let Some(answer) = self.answer.get() {
            return answer;
        }
        let ended = || GpuReport::unavailable("CUDA probe ended without an answer");
        let came = match pending.take() {
            // Asked before, unanswered then: only what came since.
            Some(rx) => match rx.try_recv() {
                Ok(report) => Some(report),
                Err(TryRecvError::Empty) => {
                    *pending = Some(rx);
                    None
                }
                Err(TryRecvError::Disconnected) => Some(ended()),
            },
            None => {
                let (tx, rx) = std::sync::mpsc::channel();
                let started = std::thread::Builder::new()
                    .name("forgesyte-gpu-probe".into())
                    .spawn(move || {
                        let _ = tx.send(probe());
                    });
                match started {
                    Err(e) => Some(GpuReport::unavailable(format!(
                        "CUDA probe not run: no thread ({e})"
                    ))),
                    Ok(_) => match rx.recv_timeout(limit) {
                        Ok(report) => Some(report),
                        Err(RecvTimeoutError::Timeout) => {
                            *pending = Some(rx);
                            None
                        }
                        Err(RecvTimeoutError::Disconnected) => Some(ended()),
                    },
                }
            }
        };
        match came {
            Some(report) => self.answer.get_or_init(|| report),
            None => self.no_answer.get_or_init(|| {
                let reason = format!(
                    "CUDA probe gave no answer within {} s (the driver's initialisation hangs)",
                    limit.as_secs()
                );
                tracing::error!(%reason, "GPU probe");
                GpuReport::unavailable(reason)
            }),
        }
    }
}

fn probe_guarded() -> GpuReport {
    let report = match panic::catch_unwind(AssertUnwindSafe(probe)) {
        Ok(report) => report,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            GpuReport::unavailable(format!("CUDA probe failed: {msg}"))
        }
    };
    log_report(&report);
    report
}

fn log_report(report: &GpuReport) {
    tracing::info!(
        available = report.available,
        devices = report.devices.len(),
        driver = report.driver_version.as_deref().unwrap_or("none"),
        reason = report.reason.as_deref().unwrap_or(""),
        "GPU probe"
    );
}

fn probe() -> GpuReport {
    if !cuda_driver_library_present() {
        return GpuReport::unavailable(NO_DRIVER);
    }
    if let Err(e) = result::init() {
        return GpuReport::unavailable(format!("CUDA driver failed to initialise: {e}"));
    }
    let driver_version = driver_version();
    let count = match result::device::get_count() {
        Ok(n) => n,
        Err(e) => {
            return GpuReport {
                driver_version,
                ..GpuReport::unavailable(format!("CUDA device count failed: {e}"))
            };
        }
    };
    let mut devices = Vec::new();
    let mut failures = Vec::new();
    // A broken driver's count is not trusted past what a machine holds.
    for ordinal in 0..count.clamp(0, MAX_DEVICES) {
        match device(ordinal) {
            Ok(dev) => devices.push(dev),
            Err(e) => failures.push(format!("device {ordinal}: {e}")),
        }
    }
    let mut report = GpuReport::with_devices(driver_version, devices);
    if !report.available && !failures.is_empty() {
        report.reason = Some(format!("no usable CUDA device ({})", failures.join("; ")));
    }
    report
}

fn driver_version() -> Option<String> {
    let mut version: std::ffi::c_int = 0;
    // SAFETY: the driver is loaded and initialised; the pointer is to a
    // live, writable c_int for the duration of the call.
    let rc = unsafe { sys::cuDriverGetVersion(&mut version) };
    rc.result().ok()?;
    Some(format!("{}.{}", version / 1000, (version % 1000) / 10))
}

fn device(ordinal: std::ffi::c_int) -> Result<GpuDevice, result::DriverError> {
    let dev = result::device::get(ordinal)?;
    let name = result::device::get_name(dev)?;
    // SAFETY: `dev` was returned by `cuDeviceGet` just above.
    let bytes = unsafe { result::device::total_mem(dev) }?;
    let attr = |a| {
        // SAFETY: `dev` was returned by `cuDeviceGet` just above.
        unsafe { result::device::get_attribute(dev, a) }
    };
    let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Ok(GpuDevice {
        ordinal: u32::try_from(ordinal).unwrap_or(0),
        name,
        total_memory_mb: (bytes as u64) / (1024 * 1024),
        compute_capability: (
            u32::try_from(major).unwrap_or(0),
            u32::try_from(minor).unwrap_or(0),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_is_consistent_with_the_driver_library() {
        let report = CudaProbe::new().report();
        if cuda_driver_library_present() {
            // A driver is here: either devices or a reason.
            assert_eq!(report.available, !report.devices.is_empty());
            assert_eq!(report.available, report.reason.is_none());
        } else {
            assert!(!report.available);
            assert!(report.devices.is_empty());
            assert_eq!(report.reason.as_deref(), Some(NO_DRIVER));
        }
    }

    /// A probe in a child process: its report is read from its stdout; a
    /// child that crashes, hangs or prints no report is "no GPU", saying
    /// how, and the caller is untouched.
    #[test]
    fn a_probe_in_a_child_is_read_and_its_crash_or_hang_is_no_gpu() {
        use std::time::{Duration, Instant};
        let run = |script: &str, timeout: Duration| {
            probe_in_child(
                std::path::Path::new("/bin/sh"),
                &["-c".into(), script.into()],
                timeout,
            )
        };
        let long = Duration::from_secs(10);
        let report = run(
            r#"printf '{"available":true,"driver_version":"12.8","devices":[{"ordinal":0,"name":"Fake","total_memory_mb":1024,"compute_capability":[8,6]}],"reason":null}'"#,
            long,
        );
        assert!(report.available, "{report:?}");
        assert_eq!(report.devices[0].compute_capability, (8, 6));
        let crashed = run("kill -SEGV $$", long);
        assert!(!crashed.available);
        let reason = crashed.reason.unwrap_or_default();
        assert!(reason.contains("was killed by signal 11"), "{reason}");
        let garbage = run("echo hello", long);
        assert!(
            garbage
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("answered no report")),
            "{garbage:?}"
        );
        let started = Instant::now();
        let hung = run("sleep 60", Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            hung.reason
                .as_deref()
                .is_some_and(|r| r.contains("timed out")),
            "{hung:?}"
        );
    }

    #[test]
    fn the_toolkit_s_stub_directories_leave_the_library_path() {
        assert_eq!(
            without_stubs(std::ffi::OsStr::new(
                "/usr/local/cuda/lib64/stubs:/usr/lib/x86_64-linux-gnu:/opt/stubs/"
            )),
            OsString::from("/usr/lib/x86_64-linux-gnu")
        );
    }

    #[test]
    fn probe_is_cached() {
        let a = CudaProbe::new().report();
        let b = CudaProbe::new().report();
        assert!(std::ptr::eq(a, b));
        assert_eq!(CudaProbe::new().probe(), *a);
    }

    #[test]
    fn a_probe_that_hangs_is_no_gpu_and_a_late_answer_is_taken() {
        use std::time::{Duration, Instant};
        fn hangs() -> GpuReport {
            std::thread::sleep(Duration::from_secs(3600));
            GpuReport::unavailable("never")
        }
        let probing: &'static Probing = Box::leak(Box::new(Probing::new()));
        let started = Instant::now();
        let report = probing.report(Duration::from_millis(200), hangs);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!report.available);
        let reason = report.reason.clone().unwrap_or_default();
        assert!(
            reason.contains("CUDA") && reason.contains("no answer"),
            "{reason}"
        );
        // Asked again: no second wait, no second probe.
        let again = Instant::now();
        assert!(std::ptr::eq(
            probing.report(Duration::from_secs(60), hangs),
            report
        ));
        assert!(again.elapsed() < Duration::from_secs(1));
        // A slow probe's answer is taken once it came.
        fn slow() -> GpuReport {
            std::thread::sleep(Duration::from_millis(300));
            GpuReport::unavailable("late answer")
        }
        let probing: &'static Probing = Box::leak(Box::new(Probing::new()));
        let first = probing.report(Duration::from_millis(50), slow);
        assert!(
            first
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("no answer"))
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let report = probing.report(Duration::from_millis(50), slow);
            if report.reason.as_deref() == Some("late answer") {
                break;
            }
            assert!(Instant::now() < deadline, "the late answer was never taken");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
