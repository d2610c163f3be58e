//! The load pipeline (seed §3): discover → manifest → register → dependencies
//! → import → instantiate → INITIALIZED, with every failure recorded.
//!
//! One file per concern; the files form a DAG (no file uses one that uses
//! it):
//!
//! - [`config`] and [`report`]: the settings and what a pass reports
//!   (leaves);
//! - [`threads`]: panics caught per item, heaps grown once (leaf);
//! - [`detached`]: a crew of threads for work that may never end (an
//!   in-process constructor), never joined;
//! - [`parallel`]: `par_map` on a rayon pool, and `par_map_pipeline`, its
//!   three-stage form with a middle stage on the calling thread and its
//!   last on the crew, each waited for at most its limit;
//! - [`pass_cache`]: what a pass looks up once (canonical parents, lock
//!   files) (leaf);
//! - [`loader`]: the [`Loader`] and its per-plugin state;
//! - [`discovery`]: plugin directories and their manifests;
//! - [`registration`]: registry keys, final states, outcomes;
//! - [`instantiate`]: one plugin from dependencies to a [`crate::PluginHandle`],
//!   with [`interpreter`] (which interpreter a Python plugin runs under,
//!   and which it must not), [`library_path`] (where a native plugin's
//!   library is) and [`pins`] (integrity pins) as its parts, each used by
//!   it and none using it;
//! - [`waves`]: dependency order and the parallel waves;
//! - [`construction`]: an in-process constructor as a crew job under its
//!   deadline, and the plugins whose given-up constructor still runs;
//! - [`verified`]: signatures and checked bytes at load (used by
//!   `instantiate`);
//! - [`load`]: a load pass; [`reload`]: a reload pass; [`rescan`]: the
//!   plugins directory discovered again (added, changed, removed), on top
//!   of both; [`stamp`]: the change stamp it compares (leaf).

mod config;
mod construction;
mod detached;
mod discovery;
mod host_short;
mod instantiate;
mod interpreter;
mod library_path;
mod load;
mod loader;
mod parallel;
mod pass_cache;
mod pins;
mod registration;
mod reload;
mod report;
mod rescan;
mod stamp;
mod threads;
mod verified;
mod waves;

pub use config::LoaderConfig;
pub(crate) use loader::drop_on_a_thread;
pub use loader::{DESTRUCTOR_WAIT, Loader};
pub use reload::{RELOADING, ReloadRefused};
pub use report::{LoadReport, PluginLoadOutcome};
pub use rescan::{RescanReport, RetiredPlugin, Retry};
pub use stamp::{loaded_by_plugins, runtime_output};
