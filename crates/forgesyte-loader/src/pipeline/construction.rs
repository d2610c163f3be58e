//! In-process construction under a deadline: a plugin's constructor as a
//! job for the crew (`detached`), why a pass gave up on one, and the
//! plugins whose given-up constructor still runs (`Loader::stuck`), which
//! are not opened or constructed again meanwhile.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use forgesyte_errors::InitError;

use super::detached::{Detached, GaveUp};
use super::loader::{Loader, Pending};

/// Why an in-process plugin was not opened or constructed: the host began
/// to stop while its load pass went on (logged at info, not as a failure
/// of the plugin's: `record_failure`).
pub(super) fn not_loaded_host_stopping() -> forgesyte_errors::PluginError {
    InitError::Failed {
        message: format!("not loaded: {}", crate::process::HOST_STOPPING),
    }
    .into()
}

/// The constructions of a wave still running, by plugin: each flag falls
/// when its constructor returns.
pub(super) type Running = RefCell<HashMap<String, Arc<AtomicBool>>>;

impl Loader {
    /// The construction of in-process plugin `p`, whose library is open,
    /// as work for a thread of its own, with its time limit (the
    /// manifest's `limits.init_timeout_s`, else the default, as for a
    /// runner's construction). Its flag in `running` falls when the
    /// constructor returns.
    pub(super) fn construction(
        &self,
        p: &Pending,
        opened: super::instantiate::Opened,
        running: &Running,
    ) -> Detached<Result<crate::PluginHandle, forgesyte_errors::PluginError>> {
        let limit = self
            .config
            .process
            .with_manifest(&p.manifest.limits)
            .init_timeout;
        self.constructing(&p.name, &opened);
        let flag = Arc::new(AtomicBool::new(true));
        running
            .borrow_mut()
            .insert(p.name.clone(), Arc::clone(&flag));
        let (name, registry, call_timeout) = (
            p.name.clone(),
            self.registry.clone(),
            p.manifest.limits.call_timeout,
        );
        let shutdown = self.shutdown.clone();
        Detached {
            work: Box::new(move || {
                let _returned = Returned(flag);
                // Queued when the host began to stop: not constructed
                // during the stop (nothing would serve it).
                if shutdown.is_set() {
                    return Err(not_loaded_host_stopping());
                }
                super::instantiate::construct(name, registry, opened, call_timeout)
            }),
            limit,
        }
    }

    /// Why in-process plugin `p`'s construction was given up on: it ran
    /// its limit (then it is remembered as stuck until it returns), or no
    /// thread could ever run it.
    pub(super) fn construction_given_up(
        &self,
        p: &Pending,
        why: GaveUp,
        running: &Running,
    ) -> forgesyte_errors::PluginError {
        match why {
            GaveUp::Ran(limit) => {
                if let Some(flag) = running.borrow_mut().remove(&p.name) {
                    self.stuck.lock().insert(
                        p.name.clone(),
                        Stuck {
                            given_up: std::time::Instant::now(),
                            running: flag,
                        },
                    );
                }
                InitError::TimedOut(forgesyte_errors::TimeoutError {
                    operation: "construction in process".to_owned(),
                    after: limit,
                    remedy: Some(format!(
                        "the constructor's thread cannot be stopped and is left running; {}; or \
                         run the plugin with \"isolation\": \"process\"",
                        crate::manifest::INIT_TIMEOUT_SET_BY
                    )),
                    stuck_at: None,
                })
                .into()
            }
            GaveUp::NoThread(why) => InitError::Failed {
                message: format!("not constructed: {why}"),
            }
            .into(),
        }
    }

    /// An in-process plugin whose constructor a pass gave up on, and that
    /// has not returned since, is not opened or constructed again: its
    /// error (one stuck thread per plugin at most).
    pub(super) fn refuse_while_constructing(
        &self,
        p: &Pending,
    ) -> Result<(), forgesyte_errors::PluginError> {
        let mut stuck = self.stuck.lock();
        let Some(still) = stuck.get(&p.name) else {
            return Ok(());
        };
        if !still.running.load(Ordering::Acquire) {
            stuck.remove(&p.name);
            return Ok(());
        }
        Err(InitError::Failed {
            message: format!(
                "its constructor of an earlier load, given up on {} s ago, has not returned; it \
                 is not constructed again until that one returns (a thread cannot be stopped: \
                 restart the server to end it)",
                still.given_up.elapsed().as_secs()
            ),
        }
        .into())
    }
}

/// An in-process constructor a pass gave up on (`Loader::stuck`): when,
/// and whether it is still running.
#[derive(Debug)]
pub(super) struct Stuck {
    given_up: std::time::Instant,
    running: Arc<AtomicBool>,
}

/// Lowers its flag when the constructor it is held by returns (or
/// panics).
struct Returned(Arc<AtomicBool>);

impl Drop for Returned {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
