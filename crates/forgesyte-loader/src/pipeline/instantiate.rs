//! Instantiation of one plugin: dependency check, library resolution,
//! preflight, import and construction, in process or in a supervised
//! runner.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use forgesyte_deps::{Dependency, DependencyChecker};
use forgesyte_errors::{DependencyError, ImportError, IntegrityError, PluginError, shorten};

use super::interpreter::runs_an_interpreter;
use super::loader::{Loader, Pending};
use super::verified::{FileCheck, Opening};
use crate::handle::PluginHandle;
use crate::host::Importer;
use crate::integrity::Target;
use crate::manifest::{self, Isolation, Manifest, PythonEntry, Runtime};
use crate::process::{self, ProcessImporter};
use crate::sandbox;
use crate::slot::Slot;
use crate::supervise::{Restart, Supervision, Supervisor};

/// How far [`Loader::check_and_start`] took a plugin.
pub(super) enum Step {
    /// Started in its runner process (a Python or isolated plugin).
    Started(PluginHandle),
    /// An in-process plugin whose checks passed: what is left is
    /// [`Loader::open_library`], then [`construct`] (on a crew thread, `detached`).
    ToOpen(Checked),
}

/// An in-process plugin that passed every check (a signed or pinned
/// library's bytes compared with their digest included): what opening its
/// library needs.
pub(super) struct Checked {
    library_path: PathBuf,
    opening: Opening,
    /// What the importer did ahead of opening it by its path.
    prepared: crate::host::Prepared,
    config: Vec<u8>,
}

/// An in-process plugin whose library is open: what constructing it needs.
pub(super) struct Opened {
    library: Arc<dyn crate::host::PluginLibrary>,
    config: Vec<u8>,
    /// The file it was opened from by path (not from checked bytes), and
    /// that file's identity taken before it was opened.
    by_path: Option<(PathBuf, Option<super::loader::FileIdentity>)>,
}

impl Loader {
    /// Everything of one plugin's instantiation but opening an in-process
    /// library and constructing it: its checks, its preflight, and for a
    /// plugin that runs in a process, its runner's start.
    pub(super) fn check_and_start(
        &self,
        p: &Pending,
        known: &forgesyte_deps::KnownPlugins,
    ) -> Result<Step, PluginError> {
        // First step: the signature (and, when required, its policy), and
        // the manifest against its lock file line.
        let signed = self.check_signature(p)?;
        self.check_manifest_pin(p)?;
        // Before any dependency check runs an interpreter the manifest
        // names (a native plugin's `py:` dependencies are asked of it too).
        self.refuse_own_interpreter(p)?;
        self.refuse_interpreter_inside(p)?;
        self.say_manifest_notes(p);
        if p.manifest.runtime == Runtime::Python {
            return self
                .instantiate_python(p, known, &signed)
                .map(Step::Started);
        }
        // A manifest of the seed's shape without its plugin.py: its library
        // is looked for first, so that without one the seed's reason is
        // given (its bare dependencies, Python packages to the seed, read
        // here as libraries, made it UNAVAILABLE over them instead).
        let found_first = super::library_path::names_no_runtime(&p.manifest)
            .then(|| self.resolve_library(p, !signed.is_empty()))
            .transpose()?;
        self.check_dependencies(p, &self.requirements(p), known)?;
        let library_path = match found_first {
            Some(path) => path,
            None => self.resolve_library(p, !signed.is_empty())?,
        };
        // Last step before anything of the plugin is opened or started.
        let target = Target::File(library_path.clone());
        let pinned = self.check_integrity(p, &target)?;
        let config = self.instance_config(p)?;
        if self.isolation_of(p) == Isolation::Process {
            let limits = self.runner_limits(p);
            let importer =
                ProcessImporter::new(self.runner(&library_path)?, p.name.clone(), limits)
                    .with_runner_args(self.config.runner_args.clone())
                    .counted_in(Arc::clone(&self.runners));
            let importer = self.confine(p, importer, &signed)?;
            // A checked library (signed, or pinned) reaches its runners as
            // the bytes that were checked, as an in-process one is loaded;
            // one that finds libraries beside its file (`$ORIGIN`) starts
            // from its file, checked again once started.
            let importer = match self.check_library(p, &library_path, &signed, pinned)? {
                Opening::Bytes(bytes, _reserved) if !crate::native::names_origin(&bytes) => {
                    importer.with_library_bytes(&library_path, &bytes)?
                }
                // What it ships beside it is loaded from those files, which
                // neither its signature nor its pin covers.
                Opening::Bytes(..) if self.config.require_signed => {
                    return Err(IntegrityError::SignatureRequired {
                        status: "signed in part".to_owned(),
                        detail: "its library's run path names $ORIGIN, so it loads the libraries \
                                 it ships beside it from their files, which the signature does \
                                 not cover (link them in, or install them where the system's \
                                 loader finds them)"
                            .to_owned(),
                    }
                    .into());
                }
                Opening::Bytes(..) | Opening::Copy(..) | Opening::Path => importer,
            };
            let check = Arc::new(self.rechecker(p, &target, &signed)?);
            let handle = self.instantiate_isolated(p, importer, (library_path, config), &check)?;
            return Self::recheck_started(&check, handle).map(Step::Started);
        }
        if self.config.require_confinement {
            return Err(ImportError::NotConfined {
                detail: "the plugin would run in the server's process, which is not confined; run it \
                         isolated (\"isolation\": \"process\" in its manifest, or --isolation process)"
                    .to_owned(),
            }
            .into());
        }
        // A checked library's bytes, read (and compared with their digest)
        // before its preflight: the preflight's runner constructs exactly
        // them, as the server then loads them. From its path, a library
        // swapped after its check and put back before its load ran unseen.
        let opening = self.check_library(p, &library_path, &signed, pinned)?;
        if self.config.preflight || p.manifest.preflight {
            self.preflight(p, &library_path, &opening, &config)?;
            self.recheck(p, &target, &signed)?;
        }
        // Here, on the pass's pool, what opening it needs that the dynamic
        // loader does not serialise: the one thread that opens libraries
        // then only maps them.
        let prepared = match opening {
            Opening::Path => self.importer.prepare(&library_path)?,
            Opening::Bytes(..) | Opening::Copy(..) => crate::host::Prepared::default(),
        };
        Ok(Step::ToOpen(Checked {
            library_path,
            opening,
            prepared,
            config,
        }))
    }

    /// Opens the library of an in-process plugin that passed its checks:
    /// the part of a load that the dynamic loader serialises (a pass runs
    /// it on one thread).
    pub(super) fn open_library(&self, name: &str, checked: Checked) -> Result<Opened, PluginError> {
        let Checked {
            library_path,
            opening,
            prepared,
            config,
        } = checked;
        let (library, by_path) = match opening {
            Opening::Path => match self.failed_library(name, &library_path) {
                Some((library, file)) => (library, Some((library_path, file))),
                None => {
                    // Before it is opened: a file replaced meanwhile then
                    // reads as changed, never the old mapping as new.
                    let file = super::loader::file_identity(&library_path);
                    let library = self.importer.open_prepared(&library_path, prepared)?;
                    (library, Some((library_path, file)))
                }
            },
            // A copy's retry reuses the copy made for it while the file
            // is unchanged, as a path's does (each mapped one more, for
            // good).
            Opening::Copy(bytes, reserved, file) => {
                match self.failed_library(name, &library_path) {
                    Some((library, kept)) => (library, Some((library_path, kept))),
                    None => {
                        let opening = Opening::Copy(bytes, reserved, file);
                        let library = self.load_library(&library_path, opening)?;
                        (library, Some((library_path, file)))
                    }
                }
            }
            opening => (self.load_library(&library_path, opening)?, None),
        };
        // The seed's marker (its module imported), at its level.
        tracing::debug!(plugin = %name, "✓ Imported plugin module: {name}");
        Ok(Opened {
            library,
            config,
            by_path,
        })
    }

    /// The library of `name`'s last construction, which failed, when it
    /// was opened from `path` and the file is unchanged since.
    fn failed_library(
        &self,
        name: &str,
        path: &Path,
    ) -> Option<(
        Arc<dyn crate::host::PluginLibrary>,
        Option<super::loader::FileIdentity>,
    )> {
        let failed = self.failed_libraries.lock();
        let kept = failed.get(name)?;
        (kept.path == path
            && kept.file.is_some()
            && kept.file == super::loader::file_identity(path))
        .then(|| (Arc::clone(&kept.library), kept.file))
    }

    /// Keeps `opened`'s library for a retry of `name` until its
    /// construction succeeds ([`Self::constructed`]).
    pub(super) fn constructing(&self, name: &str, opened: &Opened) {
        if let Some((path, file)) = &opened.by_path {
            self.failed_libraries.lock().insert(
                name.to_owned(),
                super::loader::FailedLibrary {
                    path: path.clone(),
                    file: *file,
                    library: Arc::clone(&opened.library),
                },
            );
        }
    }

    /// `name`'s construction succeeded: a later reload maps its library
    /// afresh.
    pub(super) fn constructed(&self, name: &str) {
        self.failed_libraries.lock().remove(name);
    }

    /// `name`'s load failed with `err`. Only a constructor that returned
    /// its error has its library kept for a retry: one that panicked, or
    /// ran past its limit, may have left its statics broken (a poisoned
    /// lock), and a retry gets a fresh copy, as a reload does.
    pub(super) fn construction_failed(&self, name: &str, err: &PluginError) {
        if !matches!(
            err,
            PluginError::Load(forgesyte_errors::LoadError::Init(
                forgesyte_errors::InitError::Failed { .. }
            ))
        ) {
            self.failed_libraries.lock().remove(name);
        }
    }

    /// The runner binary, or an import error saying none was found.
    fn runner(&self, library: &Path) -> Result<PathBuf, ImportError> {
        self.config
            .runner
            .clone()
            .or_else(process::find_runner)
            .ok_or_else(|| ImportError::Open {
                path: library.to_path_buf(),
                detail: format!(
                    "no plugin runner: {} was not found next to the executable or on PATH",
                    process::RUNNER_NAME
                ),
            })
    }

    /// Fails with the dependency error when something `req` asks for is
    /// missing.
    fn check_dependencies(
        &self,
        p: &Pending,
        req: &forgesyte_deps::Requirements,
        known: &forgesyte_deps::KnownPlugins,
    ) -> Result<(), PluginError> {
        let report = self.checker.check(req, &p.dir, known);
        if let Some(mut err) = report.into_error() {
            self.explain_plugin_deps(&p.manifest, &mut err);
            return Err(err.into());
        }
        Ok(())
    }

    /// A Python plugin whose interpreter is not there: that, and every
    /// other missing item of its manifest (libraries, models, plugins),
    /// which it named only once the interpreter was there. Its packages
    /// are not named: only the interpreter can be asked of them.
    fn without_interpreter(
        &self,
        p: &Pending,
        wanted: &str,
        known: &forgesyte_deps::KnownPlugins,
    ) -> PluginError {
        let mut req = self.requirements(p);
        req.dependencies
            .retain(|dep| !matches!(dep, Dependency::Py { .. }));
        let mut err = self.missing_of(p, &req, known);
        edit_missing(&mut err, |missing| {
            missing.insert(0, format!("python interpreter {wanted}"));
        });
        err.into()
    }

    /// A plugin in a `plugin:` dependency cycle (through each `hop`, its
    /// `cycle` the loop in words): that, and every other missing item of
    /// its manifest (the cycle alone hid them).
    pub(super) fn in_a_cycle(
        &self,
        p: &Pending,
        hops: &[(String, String)],
        known: &forgesyte_deps::KnownPlugins,
    ) -> DependencyError {
        let mut err = self.missing_of(p, &self.requirements(p), known);
        edit_missing(&mut err, |missing| {
            for (at_front, (hop, cycle)) in hops.iter().enumerate() {
                // `plugin:y`, `plugin:y@>=1`, or either explained
                // (`plugin:y (y is LOADED: …)`): its requirement kept.
                let at = missing.iter().position(|m| plugin_item(m, hop).is_some());
                let requirement = at
                    .and_then(|at| plugin_item(&missing[at], hop))
                    .map(|rest| rest.split(" (").next().unwrap_or_default().to_owned())
                    .unwrap_or_default();
                let item = format!("plugin:{hop}{requirement} (dependency cycle: {cycle})");
                match at {
                    Some(at) => missing[at] = item,
                    None => missing.insert(at_front, item),
                }
            }
        });
        err
    }

    /// What of `req` is missing (an empty error when nothing is), each
    /// unavailable plugin it needs explained.
    fn missing_of(
        &self,
        p: &Pending,
        req: &forgesyte_deps::Requirements,
        known: &forgesyte_deps::KnownPlugins,
    ) -> DependencyError {
        let mut err = self
            .checker
            .check(req, &p.dir, known)
            .into_error()
            .unwrap_or_else(|| DependencyError::new(Vec::new(), None));
        self.explain_plugin_deps(&p.manifest, &mut err);
        err
    }

    /// The plugin's requirements, with the interpreter its Python packages
    /// are asked of (a Python plugin's, or the host's for `py:` entries in
    /// a native manifest).
    pub(super) fn requirements(&self, p: &Pending) -> forgesyte_deps::Requirements {
        let mut req = p.manifest.requirements.clone();
        if runs_an_interpreter(p) {
            match self.interpreter(p) {
                Ok(interpreter) => req.python = Some(interpreter),
                Err(wanted) => req.python_wanted = Some(wanted),
            }
        }
        req
    }

    /// A Python plugin: its interpreter (none: UNAVAILABLE naming it), its
    /// packages (asked of that interpreter), then the host's Python runner
    /// under supervision, like an isolated native plugin.
    fn instantiate_python(
        &self,
        p: &Pending,
        known: &forgesyte_deps::KnownPlugins,
        signed: &BTreeMap<String, String>,
    ) -> Result<PluginHandle, PluginError> {
        let interpreter = match self.interpreter(p) {
            Ok(interpreter) => interpreter,
            Err(wanted) => return Err(self.without_interpreter(p, &wanted, known)),
        };
        self.check_dependencies(p, &self.requirements(p), known)?;
        // Last step before the runner is started.
        let target = Target::PythonTree(p.dir.clone());
        self.check_integrity(p, &target)?;
        let entry = p.manifest.python_entry();
        let code = match &entry {
            PythonEntry::File { file, .. } => {
                let code = manifest::join_inside(&p.dir, file);
                // A `plugin.py` that is a link out of its directory: refused
                // as a native library's is (confined, it failed with a bare
                // PermissionError; unconfined, it ran code from elsewhere).
                // Not there: the seed's reason, its directory as given
                // (the runner's named the absolute path), and no runner
                // started to find out.
                if !self.check_contained(&p.dir, &code, file)? {
                    let name = Path::new(file.as_str())
                        .file_name()
                        .map_or_else(|| file.to_string(), |n| n.to_string_lossy().into_owned());
                    // There, but a link that leads nowhere (a loop, a
                    // missing target): said so, not "not found".
                    if self.fs.is_symlink(&code).unwrap_or(false) {
                        let why = self
                            .fs
                            .canonicalize(&code)
                            .err()
                            .map_or_else(String::new, |e| format!(": {e}"));
                        return Err(ImportError::Python {
                            error_type: "ImportError".into(),
                            message: format!(
                                "{name} in {} is a link that cannot be followed{why}",
                                p.dir.display()
                            ),
                            traceback: Vec::new(),
                        }
                        .into());
                    }
                    return Err(super::library_path::seeds_not_found(&name, &p.dir, ""));
                }
                code
            }
            PythonEntry::Module { .. } => p.dir.clone(),
        };
        let limits = self.runner_limits(p);
        let mut importer =
            ProcessImporter::python(interpreter, p.dir.clone(), entry, p.name.clone(), limits)
                .counted_in(Arc::clone(&self.runners));
        if self.entry_points.read().contains_key(&p.name) {
            importer = importer.installed();
        }
        let importer = self.confine(p, importer, signed)?;
        let config = self.instance_config(p)?;
        let check = Arc::new(self.rechecker(p, &target, signed)?);
        let importer = match check.sources()? {
            Some(sources) => importer.verified_sources(&sources).map_err(|e| {
                PluginError::from(forgesyte_errors::IntegrityError::ChangedSinceCheck {
                    subject: "the plugin's files".to_owned(),
                    detail: format!("their digests cannot be handed to the runner: {e}"),
                })
            })?,
            None => importer,
        };
        let handle = self.instantiate_isolated(p, importer, (code, config), &check)?;
        Self::recheck_started(&check, handle)
    }

    /// Confines the plugin's runners when the host confines runners (its
    /// sandbox plan from its manifest, with a scratch directory of its own),
    /// and runs them as the runner user when there is one. A manifest that
    /// widens its sandbox beyond what the server's policy grants the plugin
    /// (`signed`: the digests of its signed files, empty unless signed by a
    /// trusted key) is refused, naming what it asks.
    fn confine(
        &self,
        p: &Pending,
        importer: ProcessImporter,
        signed: &BTreeMap<String, String>,
    ) -> Result<ProcessImporter, PluginError> {
        let importer = match self.config.runner_user {
            Some(user) => importer.run_as(user),
            None => importer,
        };
        if !self.config.confine {
            if self.config.require_confinement {
                return Err(ImportError::NotConfined {
                    detail: "runners are not confined (--confine off)".to_owned(),
                }
                .into());
            }
            return Ok(importer);
        }
        let scratch = sandbox::scratch_dir(&p.name, self.config.runner_user).map_err(|e| {
            ImportError::Open {
                path: p.dir.clone(),
                detail: format!("cannot create the plugin's scratch directory: {e}"),
            }
        })?;
        let req = &p.manifest.requirements;
        let (models, env_deps) = sandbox_parts(&p.dir, &p.manifest);
        let input = sandbox::PlanInput {
            plugin_dir: &p.dir,
            scratch: &scratch,
            spec: &p.manifest.sandbox,
            models: &models,
            lib_paths: &self.config.lib_paths,
            env_deps: &env_deps,
            gpu: req.gpu != forgesyte_deps::GpuRequirement::None,
        };
        let (mut plan, asks) = sandbox::Confinement::plan_checked(input, sandbox::host_env());
        // A signed plugin's manifest is the signed one (`check_signature`).
        let policy = self.config.sandbox_widening;
        if !asks.widening.is_empty() && !policy.grants(!signed.is_empty()) {
            return Err(forgesyte_errors::IntegrityError::SandboxNotGranted {
                asks: asks.widening.join("; "),
                grants: policy.grants_whom().to_owned(),
            }
            .into());
        }
        // Its signature says nothing of where its links lead.
        if !asks.links_out.is_empty() && policy != sandbox::SandboxWidening::Allow {
            return Err(forgesyte_errors::IntegrityError::SandboxNotGranted {
                asks: asks.links_out.join("; "),
                grants: "only with --sandbox-widening allow (a signature covers the \
                         manifest's text, not where a link in the plugin's directory leads)"
                    .to_owned(),
            }
            .into());
        }
        plan.required = self.config.require_confinement;
        Ok(importer.confined(plan))
    }

    /// Starts a plugin in its runner, under supervision.
    fn instantiate_isolated(
        &self,
        p: &Pending,
        importer: ProcessImporter,
        (library_path, config): (PathBuf, Vec<u8>),
        check: &Arc<FileCheck>,
    ) -> Result<PluginHandle, PluginError> {
        let limits = *importer.limits();
        let importer = Arc::new(importer);
        let library = importer.open(&library_path)?;
        tracing::debug!(plugin = %p.name, "✓ Imported plugin module: {}", p.name);
        let instance = library.instantiate(&config)?;
        tracing::debug!(plugin = %p.name, "✓ Instantiated plugin: {}", p.name);
        let slot = Arc::new(Slot::new(
            p.name.clone(),
            self.registry.clone(),
            Arc::from(instance),
        ));
        let supervisor = Supervisor::start(
            Arc::clone(&slot),
            Restart {
                importer,
                library: library_path,
                config,
                // Its restarts check the files as its load did.
                recheck: (!check.is_empty()).then(|| {
                    let check = Arc::clone(check);
                    Arc::new(move || check.run()) as crate::supervise::Recheck
                }),
            },
            Supervision {
                policy: self.config.supervision,
                clock: Arc::clone(&self.clock),
                shutdown: self.shutdown.clone(),
            },
        );
        Ok(PluginHandle::isolated(
            slot,
            limits.call_timeout,
            supervisor,
        ))
    }

    /// Constructs an in-process plugin once in a throw-away runner (no
    /// memory limit unless the manifest sets one: the host has none either).
    fn preflight(
        &self,
        p: &Pending,
        library_path: &Path,
        opening: &Opening,
        config: &[u8],
    ) -> Result<(), PluginError> {
        let mut limits = self.config.process.with_manifest(&p.manifest.limits);
        limits.memory_limit_mib = p.manifest.limits.memory_mb.unwrap_or(0);
        let importer = ProcessImporter::new(self.runner(library_path)?, p.name.clone(), limits)
            .with_runner_args(self.config.runner_args.clone())
            .counted_in(Arc::clone(&self.runners));
        // The checked bytes, as the server loads them (one that finds
        // libraries beside its file, `$ORIGIN`, from its file, as an
        // isolated plugin's runner does).
        let importer = match opening {
            Opening::Bytes(bytes, _) if !crate::native::names_origin(bytes) => {
                importer.with_library_bytes(library_path, bytes)?
            }
            Opening::Bytes(..) | Opening::Copy(..) | Opening::Path => importer,
        };
        let instance = importer.open(library_path)?.instantiate(config)?;
        // Its runner has ended before the plugin is built again in this
        // process: dropped, it was given its stop grace elsewhere, and a
        // plugin that holds what only one process may (a device, a port,
        // GPU memory) failed its second construction while the first ran.
        instance.stop();
        if !instance.wait_stopped(crate::RUNNER_STOP_WAIT) {
            tracing::warn!(plugin = %p.name, "Plugin {}: its preflight's runner had not ended after {} s; loading it anyway", p.name, crate::RUNNER_STOP_WAIT.as_secs_f64());
        }
        drop(instance);
        tracing::info!(plugin = %p.name, "Preflight passed: {}", p.name);
        Ok(())
    }

    /// Names the chain: a missing `plugin:` dependency that is registered but
    /// not available says which state it is in and why.
    fn explain_plugin_deps(&self, manifest: &Manifest, err: &mut DependencyError) {
        edit_missing(err, |missing| self.explain_in(manifest, missing));
    }

    /// See [`Self::explain_plugin_deps`].
    fn explain_in(&self, manifest: &Manifest, missing: &mut [String]) {
        for dep in &manifest.requirements.dependencies {
            let Dependency::Plugin { name, .. } = dep else {
                continue;
            };
            let explained = match self.registry.get_status(name) {
                // None of that name: one of the name in other letters, or
                // a directory of that name holding another, said.
                None => self.missing_plugin_hint(name),
                Some(status) if status.state.is_available() => None,
                // Quoted shortened: in a diamond of dependencies each layer
                // quotes two of the layer below, and whole reasons would
                // double in size at every layer.
                Some(status) => Some(format!(
                    "{name} is {}: {}",
                    status.state.as_str(),
                    quoted(status.reason.as_deref().unwrap_or("no reason recorded"))
                )),
            };
            let Some(explained) = explained else {
                continue;
            };
            for item in missing.iter_mut() {
                // Not yet explained: `plugin:y` or `plugin:y@>=1`.
                if plugin_item(item, name).is_some_and(|rest| !rest.starts_with(' ')) {
                    item.push_str(&format!(" ({explained})"));
                }
            }
        }
    }

    /// What may have been meant by `plugin:name`, which names no plugin: a
    /// plugin of that name in other letters (`plugin:Base` for `base`), or
    /// the plugin a directory of that name holds (named otherwise by its
    /// manifest).
    fn missing_plugin_hint(&self, name: &str) -> Option<String> {
        let other_case = self
            .entries
            .read()
            .keys()
            .find(|known| known.eq_ignore_ascii_case(name))
            .cloned();
        if let Some(known) = other_case {
            return Some(format!("no plugin is named so: did you mean '{known}'?"));
        }
        self.plugin_of_directory(name).map(|held| {
            format!("no plugin is named so; the plugin directory {name} holds plugin '{held}'")
        })
    }

    /// The limits of `p`'s runners: the host's, as its manifest sets them
    /// (logged when it asks for a larger answer than the host allows). A
    /// plugin that declares `requires_gpu` has no address-space limit
    /// unless its manifest sets one: a GPU driver reserves far more
    /// address space than it uses (CUDA maps tens of GiB at its start).
    fn runner_limits(&self, p: &Pending) -> process::ProcessLimits {
        let host = &self.config.process;
        if let Some(asked) = host.response_above_host(&p.manifest.limits) {
            let allowed = forgesyte_errors::Kib::of_bytes(host.max_response_bytes);
            tracing::warn!(
                plugin = %p.name,
                max_response_bytes = host.max_response_bytes,
                "limits.max_response_mb asks for {asked} MiB, more than the server allows \
                 (--max-response, {allowed}): its answers may be {allowed} at most",
            );
        }
        let mut limits = host.with_manifest(&p.manifest.limits);
        if p.manifest.limits.memory_mb.is_none()
            && p.manifest.requirements.gpu != forgesyte_deps::GpuRequirement::None
        {
            limits.memory_limit_mib = 0;
        }
        limits
    }

    /// What the host does not use of `p`'s manifest, said rather than
    /// ignored in silence: a count of worker processes (other hosts read
    /// it), a Python plugin's `"isolation": "in-process"` (it always runs
    /// in a runner of its own, SPEC §3), the runner's limits of an
    /// in-process native plugin (`memory_mb`, `max_response_mb`), likely typos of fields
    /// ([`crate::manifest::unread_field_notes`]). At WARN the first time
    /// for this plugin and manifest, then at debug level: each reload, and
    /// each rescan that retries a failing plugin, said it all again.
    fn say_manifest_notes(&self, p: &Pending) {
        let raw = &p.manifest.raw;
        let mut notes = Vec::new();
        if let Some(workers) = raw.get("workers")
            && !workers.is_null()
            && workers.as_f64() != Some(1.0)
        {
            notes.push(format!(
                "\"workers\": {workers} is not used: a plugin runs in one process (a Python \
                 plugin's calls on threads of its one runner; README, \"Concurrency\")"
            ));
        }
        notes.extend(crate::manifest::unread_field_notes(raw));
        let duplicates = &p.manifest.duplicate_fields;
        notes.extend(
            duplicates
                .paths
                .iter()
                .map(|field| format!("field {field:?} is given twice: the last one counts")),
        );
        if duplicates.more > 0 {
            notes.push(format!(
                "{} more fields are given twice (the last of each counts)",
                duplicates.more
            ));
        }
        if p.manifest.runtime != Runtime::Python && self.isolation_of(p) == Isolation::InProcess {
            let limits = &p.manifest.limits;
            // The memory limit binds its preflight's construction, when one
            // runs.
            let preflight = self.config.preflight || p.manifest.preflight;
            for (field, set) in [
                ("memory_mb", limits.memory_mb.is_some() && !preflight),
                ("max_response_mb", limits.max_response_mb.is_some()),
            ] {
                if set {
                    notes.push(format!(
                        "\"limits.{field}\" is not used: the plugin runs in the server's \
                         process, where it binds nothing; it binds a plugin run isolated \
                         (\"isolation\": \"process\", or --isolation process)"
                    ));
                }
            }
        }
        if p.manifest.runtime == Runtime::Python
            && p.manifest.declared_isolation == Some(Isolation::InProcess)
        {
            notes.push(
                "\"isolation\": \"in-process\" is not used: a Python plugin always runs in \
                 a process of its own"
                    .to_owned(),
            );
        }
        if notes.is_empty() {
            self.manifest_notes.lock().remove(&p.name);
            return;
        }
        self.manifest_notes
            .lock()
            .insert(p.name.clone(), notes.clone());
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&raw.to_string(), &mut hasher);
        let key = (p.name.clone(), std::hash::Hasher::finish(&hasher));
        let first = {
            let mut noted = self.manifest_noted.lock();
            // Bounded: a long life of edited manifests forgets the oldest
            // all at once (each is said at WARN once more).
            if noted.len() >= 4096 {
                noted.clear();
            }
            noted.insert(key)
        };
        for note in notes {
            if first {
                tracing::warn!(plugin = %p.name, "Plugin {}: its manifest's {note}", p.name);
            } else {
                tracing::debug!(plugin = %p.name, "Plugin {}: its manifest's {note}", p.name);
            }
        }
    }

    /// What the latest load of plugin `name` said of its manifest (likely
    /// typos of fields, fields given twice, fields the host does not use),
    /// each as the log line's text after "its manifest's"; empty when
    /// nothing (or when it was never instantiated: a manifest refused).
    pub fn manifest_notes(&self, name: &str) -> Vec<String> {
        self.manifest_notes
            .lock()
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// The configuration a plugin is constructed with: its manifest, its
    /// directory and its models' paths, as JSON. Refused when the
    /// directory's path is not UTF-8 (JSON text cannot hold it).
    fn instance_config(&self, p: &Pending) -> Result<Vec<u8>, PluginError> {
        // Absolute, as the SDK promises: a plugins directory given as
        // `./plugins` made them relative to the server's working directory,
        // which a plugin that changes its own, or a subprocess, does not
        // share. (Not canonical: links stay as the operator laid them out.)
        let dir = std::path::absolute(&p.dir).unwrap_or_else(|_| p.dir.clone());
        let Some(dir_text) = dir.to_str() else {
            return Err(ImportError::PathNotUtf8 { path: dir }.into());
        };
        // Under a UTF-8 directory, from the manifest's JSON strings (or
        // absolute ones of its own): UTF-8 as well.
        let models: BTreeMap<&str, String> = p
            .manifest
            .requirements
            .models
            .iter()
            .map(|(name, path)| {
                let path = DependencyChecker::resolve_model_path(&dir, path);
                (name.as_str(), path.to_string_lossy().into_owned())
            })
            .collect();
        let config = serde_json::json!({
            "manifest": &*p.manifest.raw,
            "plugin_dir": dir_text,
            "models": models,
        });
        Ok(serde_json::to_vec(&config).unwrap_or_default())
    }
}

/// What a manifest adds to its runner's sandbox besides its `network`,
/// `env` and `filesystem`: its models' paths (resolved in `dir`) and the
/// variables its `env:` dependencies name.
fn sandbox_parts(dir: &Path, manifest: &Manifest) -> (Vec<PathBuf>, Vec<String>) {
    let req = &manifest.requirements;
    let models = req.models.iter().map(|(_, path)| dir.join(path)).collect();
    let env_deps = req
        .dependencies
        .iter()
        .filter_map(|d| match d {
            Dependency::Env(name) => Some(name.clone()),
            _ => None,
        })
        .collect();
    (models, env_deps)
}

/// Constructs in-process plugin `name`, whose library is open, with its
/// manifest's `call_timeout`. Owns all it needs: it runs on a thread that
/// may be left behind (`pipeline::detached`).
pub(super) fn construct(
    name: String,
    registry: forgesyte_registry::Registry,
    opened: Opened,
    call_timeout: Option<std::time::Duration>,
) -> Result<PluginHandle, PluginError> {
    opened.library.constructed_for(&name);
    let instance =
        crate::plugin_log::as_plugin(&name, || opened.library.instantiate(&opened.config))?;
    tracing::debug!(plugin = %name, "✓ Instantiated plugin: {name}");
    Ok(PluginHandle::new(name, registry, instance, call_timeout))
}

/// What follows `plugin:NAME` in a missing item that names plugin `name`
/// (`""`, `@>=1`, or an explanation from ` (`); `None` for any other item
/// (`plugin:NAMEx`, `py:NAME`).
fn plugin_item<'a>(item: &'a str, name: &str) -> Option<&'a str> {
    item.strip_prefix("plugin:")?
        .strip_prefix(name)
        .filter(|rest| rest.is_empty() || rest.starts_with(['@', ' ']))
}

/// Changes the list of `err`'s missing items, its reason rebuilt from it
/// with its GPU detail kept: what follows the list in the reason (not what
/// follows its first "; ", which an item may hold).
fn edit_missing(err: &mut DependencyError, edit: impl FnOnce(&mut Vec<String>)) {
    let items = format!("Missing dependencies: {}", err.missing.join(", "));
    let gpu_detail = err
        .reason
        .strip_prefix(&items)
        .and_then(|rest| rest.strip_prefix("; "))
        .map(str::to_owned);
    edit(&mut err.missing);
    *err = DependencyError::new(std::mem::take(&mut err.missing), gpu_detail);
}

/// The most characters of a dependency's reason that a dependent's
/// reason quotes.
const QUOTED_REASON_CHARS: usize = 200;

/// A dependency's `reason` as a dependent quotes it: its start, cut to
/// [`QUOTED_REASON_CHARS`], and, when the cut lost it, the supervisor's
/// verdict at its end (`; not restarted: 5 restarts within 600 s`): what
/// the dependent's operator must act on (a reload), behind a crash's
/// stderr lines.
fn quoted(reason: &str) -> String {
    const VERDICT: &str = "; not restarted: ";
    let start = shorten(reason, QUOTED_REASON_CHARS);
    // Its own, at its top level: not one it quotes of its own dependency,
    // inside parentheses (which would bring their end along).
    let mut depth = 0usize;
    let mut own = None;
    for (at, c) in reason.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ';' if depth == 0 && reason[at..].starts_with(VERDICT) => own = Some(at),
            _ => {}
        }
    }
    match own {
        Some(at) if !start.contains(&reason[at..]) => {
            let verdict = shorten(&reason[at..], QUOTED_REASON_CHARS);
            format!("{start} {verdict}")
        }
        _ => start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_item_names_a_plugin_bare_with_a_version_or_explained() {
        assert_eq!(plugin_item("plugin:y", "y"), Some(""));
        assert_eq!(plugin_item("plugin:y@>=1", "y"), Some("@>=1"));
        assert_eq!(
            plugin_item("plugin:y (y is FAILED: boom)", "y"),
            Some(" (y is FAILED: boom)")
        );
        for other in ["plugin:yy", "plugin:x", "py:y", "y", "plugin:"] {
            assert_eq!(plugin_item(other, "y"), None, "{other}");
        }
    }

    #[test]
    fn a_quoted_reason_keeps_the_supervisors_verdict_past_the_cut() {
        let verdict = "; not restarted: 5 restarts within 600 s";
        let long = format!(
            "CrashError: killed by signal SIGSEGV (11); stderr: {}{verdict}",
            "x".repeat(2_000)
        );
        let quoted_long = quoted(&long);
        assert!(
            quoted_long.ends_with(&format!("… {verdict}")),
            "{quoted_long}"
        );
        assert!(quoted_long.chars().count() < 300, "{quoted_long}");
        // Within the cut, it is not said twice; without one, nothing added.
        let short = format!("CrashError: exited with code 3{verdict}");
        assert_eq!(quoted(&short), short);
        let plain = "y".repeat(500);
        assert_eq!(quoted(&plain), shorten(&plain, QUOTED_REASON_CHARS));
        // One quoted from a dependency's dependency is not its own.
        let nested = format!(
            "Missing dependencies: plugin:app (app is UNAVAILABLE: plugin:base (base is \
             FAILED: {}{verdict})), plugin:x",
            "z".repeat(300)
        );
        assert_eq!(quoted(&nested), shorten(&nested, QUOTED_REASON_CHARS));
    }
}
