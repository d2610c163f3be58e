//! Which interpreter a Python plugin runs under (its manifest's, the
//! host's), which it must not (the server's own, one inside a plugin's
//! directory under `--require-confinement`). A part of instantiation
//! ([`super::instantiate`], which starts the runner); knows interpreters,
//! not libraries or runners.

use std::path::{Path, PathBuf};

use forgesyte_errors::{ImportError, IntegrityError, PluginError};

use super::loader::{Loader, Pending};
use crate::manifest::Runtime;
use crate::python;

impl Loader {
    /// The interpreter of a Python plugin (see
    /// [`python::resolve_interpreter`]).
    pub(super) fn interpreter(&self, p: &Pending) -> Result<PathBuf, String> {
        // Under `--require-confinement` a plugin's own interpreter is let
        // through only when it is the operator's file
        // (`refuse_own_interpreter`), and then the operator's path is what
        // runs: the plugin's name for it (a link in its directory) could
        // lead elsewhere by the time it is started.
        if self.config.require_confinement {
            return python::resolve_interpreter(
                None,
                self.config.python.as_deref(),
                &p.dir,
                self.fs.as_ref(),
                std::env::var_os("PATH"),
            );
        }
        self.named_interpreter(p)
    }

    /// The interpreter the plugin's manifest names, else the operator's.
    fn named_interpreter(&self, p: &Pending) -> Result<PathBuf, String> {
        python::resolve_interpreter(
            p.manifest.python.as_deref(),
            self.config.python.as_deref(),
            &p.dir,
            self.fs.as_ref(),
            std::env::var_os("PATH"),
        )
    }

    /// Under `--require-confinement`, a plugin's Python packages are asked
    /// of, and a Python plugin runs on, the operator's interpreter only: one
    /// its manifest names (a virtualenv's `python`, with the `.pth` files
    /// of its site-packages) is the plugin's own code, which starts before
    /// a runner can confine itself, and which the dependency check would
    /// run unconfined. Checked before that check runs anything, for every
    /// runtime (a native manifest's `py:` dependencies use its `python`
    /// too; one without them never runs it); the reason names the server's
    /// interpreter.
    pub(super) fn refuse_own_interpreter(&self, p: &Pending) -> Result<(), PluginError> {
        let Some(named) = p.manifest.python.as_deref() else {
            return Ok(());
        };
        // A native plugin without Python packages never runs it.
        if !self.config.require_confinement || !runs_an_interpreter(p) {
            return Ok(());
        }
        let operators = self.interpreter(p);
        // The same file by another name (a link) is the operator's too. One
        // that cannot be found now is refused as well: found later (a copy
        // in progress), it would run.
        let same = |a: &Path, b: &Path| {
            a == b
                || matches!(
                    (self.fs.canonicalize(a), self.fs.canonicalize(b)),
                    (Ok(a), Ok(b)) if a == b
                )
        };
        if let (Ok(interpreter), Ok(operators)) = (self.named_interpreter(p), &operators)
            && same(&interpreter, operators)
        {
            return Ok(());
        }
        let theirs = operators.map_or_else(
            |wanted| format!("--python; none found now: {wanted}"),
            |path| format!("{}, or --python", path.display()),
        );
        Err(ImportError::NotConfined {
            detail: format!(
                "the plugin's manifest names its own Python interpreter ({named}), which would \
                 run unconfined (its dependency check, and a runner's start with its \
                 site-packages' .pth files, come before any confinement); serve it with the \
                 server's interpreter ({theirs}) instead"
            ),
        }
        .into())
    }

    /// A signed plugin under `--require-signed`, or a pinned one, whose
    /// manifest names an interpreter in its own directory (`"python":
    /// ".venv/bin/python"`) is refused before that interpreter runs: no
    /// signature or pin covers a virtual environment (not listed), and what
    /// it runs (its `.pth` files, `pyvenv.cfg`'s `home`, the interpreter
    /// itself) comes before the runner's checks. One whose interpreter is
    /// not found is left to fail for it.
    pub(super) fn refuse_interpreter_inside(&self, p: &Pending) -> Result<(), PluginError> {
        let Some(named) = p.manifest.python.as_deref() else {
            return Ok(());
        };
        if !runs_an_interpreter(p) || self.config.require_confinement {
            // Under `--require-confinement` the operator's interpreter runs
            // (`interpreter`), or the plugin is refused already.
            return Ok(());
        }
        let covered_by = if self.config.require_signed {
            "its signature (--require-signed)"
        } else if !self.pins(p)?.is_empty() {
            "its pin"
        } else {
            return Ok(());
        };
        if !self.names_an_interpreter_inside(p) {
            return Ok(());
        }
        Err(IntegrityError::InterpreterInside {
            interpreter: named.to_owned(),
            covered_by: covered_by.to_owned(),
        }
        .into())
    }

    /// Whether `p`'s manifest names an interpreter in `p`'s own directory
    /// (found now): by its name, or by where its directory resolves (a
    /// virtual environment's interpreter is a link to the base one, which
    /// lies elsewhere: its directory is what is in the plugin's).
    pub(super) fn names_an_interpreter_inside(&self, p: &Pending) -> bool {
        if p.manifest.python.is_none() {
            return false;
        }
        let Ok(interpreter) = self.named_interpreter(p) else {
            return false;
        };
        let resolved = |path: &Path| self.fs.canonicalize(path).ok();
        interpreter.starts_with(&p.dir)
            || matches!(
                (interpreter.parent().and_then(resolved), resolved(&p.dir)),
                (Some(i), Some(d)) if i.starts_with(&d)
            )
    }
}

/// Whether `p` runs a Python interpreter: a Python plugin, or a native one
/// whose manifest asks for Python packages (`py:`, checked by one).
pub(super) fn runs_an_interpreter(p: &Pending) -> bool {
    p.manifest.runtime == Runtime::Python
        || p.manifest.requirements.python_queries().next().is_some()
}
