//! What a manifest asks of its runner's sandbox ([`SandboxSpec`]:
//! `network`, `filesystem`, `env`, parsed by [`parse_spec`]) and whose
//! manifests may ask more than the default sandbox ([`SandboxWidening`]).
//! Knows the manifest's JSON; nothing of plans or runners.

use forgesyte_errors::ManifestError;
use serde_json::{Map, Value};

/// What a manifest asks of its runner's sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxSpec {
    /// `network`: the runner keeps the host's network (default: none).
    pub network: bool,
    /// `filesystem.read`: more paths it may read (relative to the plugin
    /// directory, or absolute).
    pub read: Vec<String>,
    /// `filesystem.write`: more paths it may write.
    pub write: Vec<String>,
    /// `env`: names of the server's environment variables it may see.
    pub env: Vec<String>,
}

/// Whose manifests may widen their sandbox (`--sandbox-widening`): a
/// manifest comes with the plugin, so what it asks for is the plugin
/// author's wish, granted by the operator's policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SandboxWidening {
    /// Every plugin's manifest.
    Allow,
    /// Only the manifests of plugins signed by a trusted key (their
    /// manifest is among the signed files): the default.
    #[default]
    Signed,
    /// No manifest: every runner gets the default sandbox or is refused.
    Deny,
}

impl SandboxWidening {
    /// Whether a plugin whose signature is (`signed`) or is not `signed`
    /// by a trusted key gets what its manifest asks.
    pub fn grants(self, signed: bool) -> bool {
        match self {
            SandboxWidening::Allow => true,
            SandboxWidening::Signed => signed,
            SandboxWidening::Deny => false,
        }
    }

    /// To whom the policy grants widening, and how to change it: the end
    /// of the reason of a plugin it refuses.
    pub fn grants_whom(self) -> &'static str {
        match self {
            SandboxWidening::Allow => "to every plugin",
            SandboxWidening::Signed => {
                "only to plugins signed by a trusted key (--sandbox-widening signed): sign it, or start the server with --sandbox-widening allow"
            }
            SandboxWidening::Deny => {
                "to no plugin (--sandbox-widening deny): start the server with --sandbox-widening signed or allow"
            }
        }
    }
}

impl std::str::FromStr for SandboxWidening {
    type Err = String;

    /// Surrounding white space is ignored, as for every other option's
    /// value (an env file's `deny `).
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "allow" => Ok(SandboxWidening::Allow),
            "signed" => Ok(SandboxWidening::Signed),
            "deny" => Ok(SandboxWidening::Deny),
            other => Err(format!("{other:?}: expected allow, signed or deny")),
        }
    }
}

/// Parses `network`, `filesystem` and `env` of a manifest object.
///
/// # Errors
///
/// A field of the wrong type, naming it.
pub fn parse_spec(obj: &Map<String, Value>) -> Result<SandboxSpec, ManifestError> {
    let wrong = |field: &str, expected: &str| ManifestError::InvalidField {
        field: field.into(),
        message: format!("expected {expected}"),
    };
    let strings = |value: Option<&Value>, field: &str| -> Result<Vec<String>, ManifestError> {
        match value {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) if !s.is_empty() && !s.contains('\0') => Ok(s.clone()),
                    _ => Err(wrong(field, "a list of non-empty strings")),
                })
                .collect(),
            Some(_) => Err(wrong(field, "a list of strings")),
        }
    };
    let network = match obj.get("network") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(wrong("network", "true or false")),
    };
    let (read, write) = match obj.get("filesystem") {
        None | Some(Value::Null) => (Vec::new(), Vec::new()),
        Some(Value::Object(fs)) => {
            if let Some(key) = fs.keys().find(|k| *k != "read" && *k != "write") {
                return Err(wrong(
                    &format!("filesystem.{key}"),
                    "only 'read' and 'write'",
                ));
            }
            (
                strings(fs.get("read"), "filesystem.read")?,
                strings(fs.get("write"), "filesystem.write")?,
            )
        }
        Some(_) => return Err(wrong("filesystem", "an object with 'read' and 'write'")),
    };
    let env = strings(obj.get("env"), "env")?;
    Ok(SandboxSpec {
        network,
        read,
        write,
        env,
    })
}
