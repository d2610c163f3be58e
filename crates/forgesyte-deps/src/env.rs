//! The environment seam and its real implementation.

use std::fmt::Debug;

/// Variables the server takes out of its own environment as it starts
/// (its admin token, the signing key's password): no plugin, in process or
/// in a runner, ever sees them, so an `env:` dependency on one is never
/// met, and its reason says why.
pub const WITHHELD_VARIABLES: [&str; 2] = [ADMIN_TOKEN_VARIABLE, KEY_PASSWORD_VARIABLE];
/// The admin token's variable (withheld from plugins).
pub const ADMIN_TOKEN_VARIABLE: &str = "FORGESYTE_ADMIN_TOKEN";
/// The signing key password's variable (withheld from plugins).
pub const KEY_PASSWORD_VARIABLE: &str = "FORGESYTE_KEY_PASSWORD";

/// Read access to environment variables.
pub trait EnvProbe: Send + Sync + Debug {
    /// The variable's value, or `None` when it is not set (or its name is
    /// not a valid variable name). Non-UTF-8 values are converted lossily.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvProbe for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        if name.is_empty() || name.contains(['=', '\0']) {
            return None;
        }
        std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_path_and_rejects_bad_names() {
        assert!(ProcessEnv.var("PATH").is_some());
        assert_eq!(ProcessEnv.var("FORGESYTE_DEFINITELY_UNSET_XYZ"), None);
        assert_eq!(ProcessEnv.var(""), None);
        assert_eq!(ProcessEnv.var("A=B"), None);
        assert_eq!(ProcessEnv.var("A\0B"), None);
    }
}
