//! The GPU seam: what a probe reports, and how a requirement is judged
//! against that report.

use std::fmt::Debug;

use serde::{Deserialize, Serialize};

use crate::requirements::GpuRequirement;

/// Looks at the machine's GPUs.
pub trait GpuProbe: Send + Sync + Debug {
    /// What the machine has. Never panics; "no GPU" is a report, not an error.
    fn probe(&self) -> GpuReport;
}

/// The result of a GPU probe, as the server shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuReport {
    /// At least one CUDA device is usable.
    pub available: bool,
    /// The CUDA driver's version (`"12.8"`), when a driver answered.
    pub driver_version: Option<String>,
    /// Every device found, by ordinal.
    pub devices: Vec<GpuDevice>,
    /// Why no GPU is usable (`None` when one is).
    pub reason: Option<String>,
}

/// A [`GpuProbe`] that reports no GPU, for a reason it is given, without
/// probing anything (no CUDA driver is loaded): for a host told to run no
/// GPU plugins.
#[derive(Debug, Clone)]
pub struct NoGpu {
    reason: String,
}

impl NoGpu {
    /// No GPU, for `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        NoGpu {
            reason: reason.into(),
        }
    }
}

impl GpuProbe for NoGpu {
    fn probe(&self) -> GpuReport {
        GpuReport::unavailable(self.reason.clone())
    }
}

impl GpuReport {
    /// A report of no usable GPU, for the given reason.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        GpuReport {
            available: false,
            driver_version: None,
            devices: Vec::new(),
            reason: Some(reason.into()),
        }
    }

    /// A report of the given devices under the given driver; with no device
    /// it is "unavailable" with the reason `no CUDA device found`.
    pub fn with_devices(driver_version: Option<String>, devices: Vec<GpuDevice>) -> Self {
        let available = !devices.is_empty();
        GpuReport {
            available,
            driver_version,
            devices,
            reason: (!available).then(|| "no CUDA device found".to_string()),
        }
    }
}

/// One CUDA device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    /// The device's CUDA ordinal.
    pub ordinal: u32,
    /// Its name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total memory in MiB.
    pub total_memory_mb: u64,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (u32, u32),
}

/// Judges a requirement against a report: `None` when it is met, otherwise a
/// sentence saying why not (always containing both `GPU` and `CUDA`).
pub(crate) fn unmet(req: &GpuRequirement, report: &GpuReport) -> Option<String> {
    let (min_devices, min_memory_mb, min_cc) = match req {
        GpuRequirement::None => return None,
        GpuRequirement::Any => (1, None, None),
        GpuRequirement::Spec {
            min_devices,
            min_memory_mb,
            min_compute_capability,
        } => (
            min_devices.unwrap_or(1).max(1),
            *min_memory_mb,
            *min_compute_capability,
        ),
    };
    let wanted = describe_wanted(min_devices, min_memory_mb, min_cc);
    if !report.available || report.devices.is_empty() {
        let why = report
            .reason
            .as_deref()
            .filter(|r| !r.is_empty())
            .unwrap_or("no CUDA device found");
        return Some(format!(
            "Plugin requires {wanted} but CUDA is not available: {why}"
        ));
    }
    let mut qualifying = 0u64;
    let mut shortfalls = Vec::new();
    for dev in &report.devices {
        let mut short = Vec::new();
        if let Some(min) = min_memory_mb
            && dev.total_memory_mb < min
        {
            let (have, need) = fmt_mb_pair(dev.total_memory_mb, min);
            short.push(format!("{have} < {need}"));
        }
        if let Some(min) = min_cc
            && dev.compute_capability < min
        {
            short.push(format!(
                "compute {} < {}",
                fmt_cc(dev.compute_capability),
                fmt_cc(min)
            ));
        }
        if short.is_empty() {
            qualifying += 1;
        } else {
            shortfalls.push(format!(
                "device {} ({}): {}",
                dev.ordinal,
                dev.name,
                short.join(", ")
            ));
        }
    }
    if qualifying >= u64::from(min_devices) {
        return None;
    }
    let found = report.devices.len();
    if shortfalls.is_empty() {
        Some(format!(
            "Plugin requires {wanted} but only {found} CUDA {} available",
            if found == 1 {
                "device is"
            } else {
                "devices are"
            }
        ))
    } else {
        Some(format!(
            "Plugin requires {wanted} but only {qualifying} of {found} CUDA {} qualify: {}",
            if found == 1 { "device" } else { "devices" },
            shortfalls.join("; ")
        ))
    }
}

fn describe_wanted(
    min_devices: u32,
    min_memory_mb: Option<u64>,
    min_cc: Option<(u32, u32)>,
) -> String {
    let mut s = if min_devices == 1 {
        "a GPU (CUDA)".to_string()
    } else {
        format!("{min_devices} GPUs (CUDA)")
    };
    let mut with = Vec::new();
    if let Some(mb) = min_memory_mb {
        with.push(format!("at least {} of memory", fmt_mb(mb)));
    }
    if let Some(cc) = min_cc {
        with.push(format!("compute capability >= {}", fmt_cc(cc)));
    }
    if !with.is_empty() {
        s.push_str(" with ");
        s.push_str(&with.join(" and "));
    }
    s
}

fn fmt_mb(mb: u64) -> String {
    if mb >= 1024 && mb.is_multiple_of(1024) {
        format!("{} GiB", mb / 1024)
    } else {
        format!("{mb} MB")
    }
}

/// Formats two sizes in the same unit: GiB when both are whole GiB.
fn fmt_mb_pair(a: u64, b: u64) -> (String, String) {
    if a.is_multiple_of(1024) && b.is_multiple_of(1024) && a > 0 && b > 0 {
        (fmt_mb(a), fmt_mb(b))
    } else {
        (format!("{a} MB"), format!("{b} MB"))
    }
}

fn fmt_cc((major, minor): (u32, u32)) -> String {
    format!("{major}.{minor}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(ordinal: u32, mem_gib: u64, cc: (u32, u32)) -> GpuDevice {
        GpuDevice {
            ordinal,
            name: format!("Card {ordinal}"),
            total_memory_mb: mem_gib * 1024,
            compute_capability: cc,
        }
    }

    fn report(devices: Vec<GpuDevice>) -> GpuReport {
        GpuReport::with_devices(Some("12.8".into()), devices)
    }

    fn spec(n: Option<u32>, mem: Option<u64>, cc: Option<(u32, u32)>) -> GpuRequirement {
        GpuRequirement::Spec {
            min_devices: n,
            min_memory_mb: mem,
            min_compute_capability: cc,
        }
    }

    /// Asserts the requirement is unmet with a detail holding `GPU`, `CUDA`
    /// and every expected fragment.
    fn check_unmet(req: GpuRequirement, rep: &GpuReport, fragments: &[&str]) {
        let detail = unmet(&req, rep).expect("requirement should be unmet");
        assert!(
            detail.contains("GPU") && detail.contains("CUDA"),
            "{detail}"
        );
        for f in fragments {
            assert!(detail.contains(f), "{detail:?} lacks {f:?}");
        }
    }

    #[test]
    fn none_is_always_met() {
        assert_eq!(
            unmet(&GpuRequirement::None, &GpuReport::unavailable("x")),
            None
        );
    }

    #[test]
    fn no_driver_names_the_reason() {
        check_unmet(
            GpuRequirement::Any,
            &GpuReport::unavailable("CUDA driver library (libcuda.so) not found"),
            &["libcuda.so", "not available"],
        );
        check_unmet(
            GpuRequirement::Any,
            &report(vec![]),
            &["no CUDA device found"],
        );
        check_unmet(
            spec(None, None, None),
            &GpuReport {
                available: false,
                driver_version: None,
                devices: vec![],
                reason: None,
            },
            &["no CUDA device found"],
        );
    }

    #[test]
    fn any_gpu_is_met_by_one_device() {
        assert_eq!(
            unmet(&GpuRequirement::Any, &report(vec![dev(0, 8, (7, 5))])),
            None
        );
        assert_eq!(
            unmet(&spec(None, None, None), &report(vec![dev(0, 8, (7, 5))])),
            None
        );
    }

    #[test]
    fn too_few_devices() {
        check_unmet(
            spec(Some(2), None, None),
            &report(vec![dev(0, 8, (7, 5))]),
            &["2 GPUs", "only 1 CUDA device is available"],
        );
        assert_eq!(
            unmet(
                &spec(Some(2), None, None),
                &report(vec![dev(0, 8, (7, 5)), dev(1, 8, (7, 5))])
            ),
            None
        );
    }

    #[test]
    fn memory_and_compute_shortfalls_are_spelled_out() {
        check_unmet(
            spec(None, Some(16 * 1024), Some((8, 0))),
            &report(vec![dev(0, 8, (7, 5))]),
            &[
                "8 GiB < 16 GiB",
                "compute 7.5 < 8.0",
                "device 0 (Card 0)",
                "0 of 1",
            ],
        );
        check_unmet(
            spec(None, Some(16000), None),
            &report(vec![dev(0, 8, (9, 0))]),
            &["8192 MB < 16000 MB"],
        );
        // One device qualifies, two are needed.
        check_unmet(
            spec(Some(2), Some(16 * 1024), None),
            &report(vec![dev(0, 80, (9, 0)), dev(1, 8, (9, 0))]),
            &["1 of 2", "device 1 (Card 1): 8 GiB < 16 GiB"],
        );
        assert_eq!(
            unmet(
                &spec(Some(1), Some(16 * 1024), Some((8, 0))),
                &report(vec![dev(0, 8, (9, 0)), dev(1, 80, (9, 0))])
            ),
            None
        );
    }

    #[test]
    fn compute_capability_compares_as_a_pair() {
        assert_eq!(
            unmet(
                &spec(None, None, Some((8, 6))),
                &report(vec![dev(0, 8, (9, 0))])
            ),
            None
        );
        check_unmet(
            spec(None, None, Some((8, 6))),
            &report(vec![dev(0, 8, (8, 0))]),
            &["compute 8.0 < 8.6"],
        );
    }

    #[test]
    fn report_constructors() {
        let r = GpuReport::with_devices(None, vec![]);
        assert!(!r.available);
        assert_eq!(r.reason.as_deref(), Some("no CUDA device found"));
        let r = report(vec![dev(0, 1, (8, 0))]);
        assert!(r.available && r.reason.is_none());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["devices"][0]["compute_capability"],
            serde_json::json!([8, 0])
        );
    }
}
