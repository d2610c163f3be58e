//! `forgesyte keygen` and `forgesyte sign`: the plugin author's side of
//! plugin signatures (the host's side is `forgesyte_loader::signature`).
//!
//! Each function prints what it did (stdout) or why it could not
//! (stderr, prefixed with the command) and returns the exit code: 0 done,
//! 1 failed, 2 a usage error. This module knows no HTTP and no loader
//! state; the password of an encrypted key comes from
//! [`PASSWORD_ENV`], never from a prompt (the commands run unattended).

use std::path::Path;

use forgesyte_loader::signature::{
    self,
    keys::{PASSWORD_ENV, Password},
};

/// [`PASSWORD_ENV`] for `command`; a value that is not UTF-8 (no password
/// minisign takes) is said on stderr, and is a usage error (`Err(2)`).
fn password_from_env(command: &str) -> Result<Password, u8> {
    match std::env::var(PASSWORD_ENV) {
        Ok(p) if p.is_empty() => Ok(Password::Empty),
        Ok(p) => Ok(Password::Given(p)),
        Err(std::env::VarError::NotPresent) => Ok(Password::Unset),
        Err(std::env::VarError::NotUnicode(_)) => {
            crate::say!("forgesyte {command}: {PASSWORD_ENV} is not valid UTF-8");
            Err(2)
        }
    }
}

/// `forgesyte keygen --out DIR [--name NAME] [--unencrypted]`: writes
/// `DIR/NAME.key` (0600) and `DIR/NAME.pub`. The secret key is encrypted
/// with [`PASSWORD_ENV`]; without it, `unencrypted` must be asked for.
pub fn keygen(out: &Path, name: &str, unencrypted: bool) -> u8 {
    let given = match password_from_env("keygen") {
        Ok(given) => given,
        Err(code) => return code,
    };
    let password = match (given, unencrypted) {
        // Asked for both: whoever set the password expects it used.
        (Password::Given(_), true) => {
            crate::say!(
                "forgesyte keygen: {PASSWORD_ENV} is set, and --unencrypted asks for a key \
                 without a password: unset {PASSWORD_ENV}, or leave out --unencrypted"
            );
            return 2;
        }
        (_, true) => None,
        (Password::Given(password), false) => Some(password),
        (Password::Empty, false) => {
            crate::say!(
                "forgesyte keygen: {PASSWORD_ENV} is empty: set it to a password to encrypt \
                 the secret key, or pass --unencrypted"
            );
            return 2;
        }
        (Password::Unset, false) => {
            crate::say!(
                "forgesyte keygen: set {PASSWORD_ENV} to encrypt the secret key, or pass --unencrypted"
            );
            return 2;
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
    let given = match password_from_env("sign") {
        Ok(given) => given,
        Err(code) => return code,
    };
    let secret = match signature::keys::read_secret_key(key, given) {
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
                crate::controls::Escaped(&dir.display().to_string()),
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
