//! `forgesyte keygen` and `forgesyte sign`: the plugin author's side of
//! plugin signatures (the host's side is `forgesyte_loader::signature`).
//!
//! Each function prints what it did (stdout) or why it could not
//! (stderr, prefixed with the command) and returns the exit code: 0 done,
//! 1 failed, 2 a usage error. This module knows no HTTP and no loader
//! state; the password of an encrypted key comes from
//! [`PASSWORD_ENV`], never from a prompt (the commands run unattended).

use std::path::Path;

use forgesyte_loader::signature::{self, keys::PASSWORD_ENV};

/// The password from [`PASSWORD_ENV`], if set and not empty.
fn password_from_env() -> Option<String> {
    std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty())
}

/// `forgesyte keygen --out DIR [--name NAME] [--unencrypted]`: writes
/// `DIR/NAME.key` (0600) and `DIR/NAME.pub`. The secret key is encrypted
/// with [`PASSWORD_ENV`]; without it, `unencrypted` must be asked for.
pub fn keygen(out: &Path, name: &str, unencrypted: bool) -> u8 {
    let password = if unencrypted {
        // Asked for both: whoever set the password expects it used.
        if password_from_env().is_some() {
            crate::say!(
                "forgesyte keygen: {PASSWORD_ENV} is set, and --unencrypted asks for a key \
                 without a password: unset {PASSWORD_ENV}, or leave out --unencrypted"
            );
            return 2;
        }
        None
    } else {
        match password_from_env() {
            Some(password) => Some(password),
            None => {
                crate::say!(
                    "forgesyte keygen: set {PASSWORD_ENV} to encrypt the secret key, or pass --unencrypted"
                );
                return 2;
            }
        }
    };
    if let Err(e) = std::fs::create_dir_all(out) {
        // `create_dir_all` of a file says "File exists".
        let why = if out.exists() && !out.is_dir() {
            "it is not a directory".to_owned()
        } else {
            e.to_string()
        };
        crate::say!(
            "forgesyte keygen: --out {}: cannot create the directory: {why}",
            out.display()
        );
        return 1;
    }
    match signature::keys::keygen(out, name, password) {
        Ok((key, public, id)) => {
            crate::tell!("Key id {id}");
            crate::tell!("Secret key: {} (keep it private)", key.display());
            crate::tell!(
                "Public key: {} (copy it into the server's --trusted-keys directory)",
                public.display()
            );
            0
        }
        Err(e) => {
            crate::say!("forgesyte keygen: {e}");
            1
        }
    }
}

/// `forgesyte sign DIR --key KEY`: writes `DIR/forgesyte.sig.list` and
/// `DIR/forgesyte.sig.list.minisig`.
pub fn sign(dir: &Path, key: &Path) -> u8 {
    if !dir
        .join(forgesyte_loader::manifest::MANIFEST_FILE)
        .is_file()
    {
        crate::say!(
            "forgesyte sign: {} is not a plugin directory (no manifest.json)",
            dir.display()
        );
        return 2;
    }
    let secret = match signature::keys::read_secret_key(key, password_from_env()) {
        Ok(secret) => secret,
        Err(e) => {
            crate::say!("forgesyte sign: {e}");
            return 1;
        }
    };
    match signature::sign_dir(&forgesyte_deps::RealFs, dir, &secret) {
        Ok(outcome) => {
            // Control characters escaped, as `check` prints names: a
            // file's name may hold a terminal's control sequence.
            for file in &outcome.files {
                crate::tell!("  {}", crate::controls::Escaped(file));
            }
            crate::tell!(
                "Signed {} ({} files) with key {}: {} and {}",
                dir.display(),
                outcome.files.len(),
                outcome.key_id,
                signature::LIST_FILE,
                signature::SIG_FILE
            );
            0
        }
        Err(e) => {
            crate::say!("forgesyte sign: {e}");
            1
        }
    }
}
