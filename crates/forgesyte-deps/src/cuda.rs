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
#![allow(unsafe_code)]

use std::panic::{self, AssertUnwindSafe};
use std::sync::OnceLock;

use cudarc::driver::{result, sys};

use crate::gpu::{GpuDevice, GpuProbe, GpuReport};

/// How long the probe may take before its answer is "no GPU" (its thread
/// is left to finish or hang: a thread in a driver call cannot be stopped).
pub(crate) const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Reason given when the driver library cannot be loaded.
const NO_DRIVER: &str = "CUDA driver library (libcuda.so) not found";

/// The real GPU probe. The machine is probed once per process, on first
/// use; every later call answers from that result.
#[derive(Debug, Clone, Copy, Default)]
pub struct CudaProbe {
    _private: (),
}

impl CudaProbe {
    /// A probe; nothing is loaded until the first [`report`](Self::report).
    pub fn new() -> Self {
        CudaProbe::default()
    }

    /// The machine's GPUs, probed on first call and cached for the process.
    pub fn report(&self) -> &'static GpuReport {
        static REPORT: OnceLock<GpuReport> = OnceLock::new();
        REPORT.get_or_init(|| probe_within(PROBE_TIMEOUT, probe_guarded))
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

/// `probe`'s report, or "no GPU" when it takes longer than `limit` (or its
/// thread cannot be started).
fn probe_within(limit: std::time::Duration, probe: fn() -> GpuReport) -> GpuReport {
    let (tx, rx) = std::sync::mpsc::channel();
    let started = std::thread::Builder::new()
        .name("forgesyte-gpu-probe".into())
        .spawn(move || {
            let _ = tx.send(probe());
        });
    if let Err(e) = started {
        return GpuReport::unavailable(format!("CUDA probe not run: no thread ({e})"));
    }
    rx.recv_timeout(limit).unwrap_or_else(|_| {
        let reason = format!(
            "CUDA probe gave no answer within {} s (the driver's initialisation hangs)",
            limit.as_secs()
        );
        tracing::error!(%reason, "GPU probe");
        GpuReport::unavailable(reason)
    })
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
    tracing::info!(
        available = report.available,
        devices = report.devices.len(),
        driver = report.driver_version.as_deref().unwrap_or("none"),
        reason = report.reason.as_deref().unwrap_or(""),
        "GPU probe"
    );
    report
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
    for ordinal in 0..count.max(0) {
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

    #[test]
    fn probe_is_cached() {
        let a = CudaProbe::new().report();
        let b = CudaProbe::new().report();
        assert!(std::ptr::eq(a, b));
        assert_eq!(CudaProbe::new().probe(), *a);
    }

    #[test]
    fn a_probe_that_hangs_is_no_gpu_after_the_limit() {
        use std::time::{Duration, Instant};
        fn hangs() -> GpuReport {
            std::thread::sleep(Duration::from_secs(3600));
            GpuReport::unavailable("never")
        }
        let started = Instant::now();
        let report = probe_within(Duration::from_millis(200), hangs);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!report.available);
        let reason = report.reason.unwrap_or_default();
        assert!(
            reason.contains("CUDA") && reason.contains("no answer"),
            "{reason}"
        );
        // A probe that answers is answered.
        let report = probe_within(Duration::from_secs(5), || GpuReport::unavailable("fake"));
        assert_eq!(report.reason.as_deref(), Some("fake"));
    }
}
