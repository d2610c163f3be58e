//! The runner's side of confinement: [`apply`] enforces a plan on the
//! native runner's own process (a network namespace, Landlock, capabilities
//! dropped, not dumpable, Landlock scopes, the seccomp filter of
//! [`super::seccomp`]), and the words its hello reports each part with
//! ([`NETWORK_NO_SOCKETS`], [`MEMORY_PRIVATE`], [`CAPABILITIES_DROPPED`],
//! [`CAPABILITIES_NONE`], [`SCOPES`]; the Python runner says the same).
//! Knows the plan ([`Confinement`]) and the kernel; nothing of the host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Confinement, seccomp};

/// Applies `plan` to this process (the native runner, before it opens the
/// plugin's library): a network namespace of its own unless the plan keeps
/// the network, then Landlock, capabilities dropped, not dumpable, and the
/// seccomp filter. The environment is the host's to set (it
/// starts the native runner with the plan's environment). Returns what was
/// enforced, part by part.
#[allow(unsafe_code)]
pub fn apply(plan: &Confinement) -> BTreeMap<String, String> {
    // Before Landlock may close `/proc` to it.
    let kin = seccomp::Kin::of_this_process();
    let mut report = BTreeMap::new();
    report.insert("env".to_owned(), "scrubbed".to_owned());
    // SAFETY: `NEWNET` leaves the file descriptor table alone (the hazard
    // `unshare_unsafe` names is `FILES`); it runs before the runner starts
    // any thread.
    let namespace = (!plan.network)
        .then(|| unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) });
    let mut left_out = Vec::new();
    let filesystem = match landlock(plan, &mut left_out) {
        Ok(text) => text,
        Err(e) => format!("unconfined: {e}"),
    };
    report.insert("filesystem".to_owned(), filesystem);
    if !left_out.is_empty() {
        report.insert("unreachable".to_owned(), left_out.join("; "));
    }
    if scope() {
        report.insert("scopes".to_owned(), SCOPES.to_owned());
    }
    report.insert("capabilities".to_owned(), drop_capabilities());
    report.insert("memory".to_owned(), not_dumpable());
    // Last: nothing above makes a socket, and the runner reads its
    // shared-memory socket (already open) only later.
    let syscalls = seccomp::install(plan.network, kin);
    let filtered = !syscalls.starts_with("unconfined");
    report.insert("syscalls".to_owned(), syscalls);
    let network = match namespace {
        None => "allowed".to_owned(),
        Some(Ok(())) => "isolated: a network namespace of its own".to_owned(),
        // Landlock's TCP rights alone are no isolation (TCP Fast Open's
        // `sendto`, a `listen` without `bind`, UDP): no socket at all is.
        Some(Err(_)) if filtered => NETWORK_NO_SOCKETS.to_owned(),
        Some(Err(e)) => format!("unconfined: no network namespace ({e})"),
    };
    report.insert("network".to_owned(), network);
    report
}

/// What the hello's `network` says of a runner without the network that
/// could not make a network namespace (a runner of another user: that needs
/// `CAP_SYS_ADMIN`) but whose seccomp filter refuses every new socket (the
/// Python runner says the same).
pub const NETWORK_NO_SOCKETS: &str =
    "isolated: no network namespace (it may not make one), and no new socket (the seccomp filter)";

/// What the hello's `memory` says of a runner that made itself not
/// dumpable (the Python runner says the same).
pub const MEMORY_PRIVATE: &str = "not dumpable: its /proc files (its memory, its open files) \
     are root's, closed to the other processes of a runner user that is not root";

/// Makes this process not dumpable: its `/proc/PID` files belong to root,
/// so the other processes of a runner user that is not root cannot open
/// its memory, its descriptors (the memory files that carry frames) or its
/// environment there, whatever Landlock can or cannot rule. No core dump
/// is written when it crashes.
fn not_dumpable() -> String {
    use rustix::process::{DumpableBehavior, set_dumpable_behavior};
    match set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        Ok(()) => MEMORY_PRIVATE.to_owned(),
        Err(e) => format!("unconfined: cannot make it not dumpable ({e})"),
    }
}

/// What the hello's `capabilities` says of a runner that held some and
/// dropped them all (the Python runner says the same).
pub const CAPABILITIES_DROPPED: &str =
    "dropped: all of them (a root runner keeps uid 0, not root's privileges)";
/// ... and of a runner that held none to drop.
pub const CAPABILITIES_NONE: &str = "none held";

/// Drops every capability of this process, last step of its confinement
/// (the network namespace needed `CAP_SYS_ADMIN`): the bounding set (while
/// `CAP_SETPCAP` still allows it), the ambient set, then the effective,
/// permitted and inheritable sets. A root runner without `--runner-user`
/// then keeps uid 0 but cannot load a kernel module, `setns` into another
/// process's namespaces through `/proc`, trace a process, mount, or read
/// files it does not own.
fn drop_capabilities() -> String {
    use rustix::io::Errno;
    use rustix::thread::{
        CapabilitySet, CapabilitySets, capabilities, clear_ambient_capability_set,
        remove_capability_from_bounding_set, set_capabilities,
    };
    let held = match capabilities(None) {
        Ok(held) => held,
        Err(e) => return format!("unconfined: cannot read them ({e})"),
    };
    let none = CapabilitySet::empty();
    let held_any = held.effective != none || held.permitted != none || held.inheritable != none;
    if held.effective.contains(CapabilitySet::SETPCAP) {
        // One by one up to the first the kernel does not know.
        for bit in 0..u64::BITS {
            match remove_capability_from_bounding_set(CapabilitySet::from_bits_retain(1 << bit)) {
                Ok(()) => {}
                Err(Errno::INVAL) => break,
                Err(e) => {
                    return format!("unconfined: cannot drop them from the bounding set ({e})");
                }
            }
        }
    }
    // No ambient set on kernels before 4.3: nothing to clear there.
    let _ = clear_ambient_capability_set();
    let empty = CapabilitySets {
        effective: none,
        permitted: none,
        inheritable: none,
    };
    match set_capabilities(None, empty) {
        Ok(()) if held_any => CAPABILITIES_DROPPED.to_owned(),
        Ok(()) => CAPABILITIES_NONE.to_owned(),
        Err(e) => format!("unconfined: cannot drop them ({e})"),
    }
}

/// What the hello's `scopes` says where Landlock scopes a runner (the
/// Python runner says the same).
pub const SCOPES: &str = "abstract Unix sockets and signals: its own processes only";

/// Landlock scopes (ABI 6), a layer of their own after [`landlock`]'s so an
/// older kernel's lack of them leaves that status as it was: this runner may
/// connect to abstract Unix sockets and signal processes only inside its own
/// Landlock domain, not another runner's (nor the host's). Whether they are
/// enforced.
fn scope() -> bool {
    use landlock::{Ruleset, RulesetAttr, RulesetStatus, Scope};
    Ruleset::default()
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .and_then(|ruleset| ruleset.create())
        .and_then(|created| created.restrict_self())
        .is_ok_and(|status| status.ruleset == RulesetStatus::FullyEnforced)
}

/// The Landlock part of [`apply`]: what is enforced, and whether TCP is
/// denied.
fn landlock(
    plan: &Confinement,
    left_out: &mut Vec<String>,
) -> Result<String, landlock::RulesetError> {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    };
    let abi = ABI::V5;
    let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(abi))?;
    if !plan.network {
        ruleset = ruleset.handle_access(AccessNet::from_all(abi))?;
    }
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev;
    let status = ruleset
        .create()?
        .add_rules(rules_without_links(
            &plan.read,
            AccessFs::from_read(abi),
            abi,
            left_out,
        ))?
        .add_rules(rules_without_links(
            &plan.write,
            AccessFs::from_all(abi),
            abi,
            left_out,
        ))?
        .add_rules(rules_without_links(&plan.devices, device, abi, left_out))?
        .restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "confined: Landlock, fully enforced",
        RulesetStatus::PartiallyEnforced => {
            "confined: Landlock, partly enforced (an older kernel ABI)"
        }
        RulesetStatus::NotEnforced => "unconfined: this kernel does not enforce Landlock",
    }
    .to_owned())
}

/// Landlock rules allowing `access` beneath each of `paths` (a plan's,
/// which the host resolved: no link in them), each opened without following
/// a link (`openat2`, `RESOLVE_NO_SYMLINKS`): a path that became a link
/// since its plan was made (a plugin may make links where it may write)
/// allows nothing, not what the link leads to. A path that is not there
/// allows nothing either. A file gets the rights that apply to files.
/// A path left out for another reason than not being there (a link now, a
/// container refusing `openat2`, no permission) is added to `left_out`,
/// which the hello reports as `unreachable`: the plugin that then fails
/// with a bare permission error has its cause in its health.
pub(super) fn rules_without_links<'a>(
    paths: &'a [PathBuf],
    access: landlock::BitFlags<landlock::AccessFs>,
    abi: landlock::ABI,
    left_out: &'a mut Vec<String>,
) -> impl Iterator<Item = Result<landlock::PathBeneath<std::os::fd::OwnedFd>, landlock::RulesetError>> + 'a
{
    use rustix::fs::{CWD, FileType, Mode, OFlags, ResolveFlags};
    paths.iter().filter_map(move |path| {
        let fd = match rustix::fs::openat2(
            CWD,
            path,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => return None,
            Err(e) => {
                left_out.push(unreachable_path(path, e));
                return None;
            }
        };
        let is_dir = rustix::fs::fstat(&fd)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
        let access = if is_dir {
            access
        } else {
            access & landlock::AccessFs::from_file(abi)
        };
        Some(Ok(landlock::PathBeneath::new(fd, access)))
    })
}

/// How the hello's `unreachable` names a plan path a runner could not open
/// (the Python runner's `_unreachable` says the same).
fn unreachable_path(path: &Path, e: rustix::io::Errno) -> String {
    let why = if e == rustix::io::Errno::LOOP {
        "a link now, which is not followed".to_owned()
    } else {
        std::io::Error::from(e).to_string()
    };
    format!("{}: {why}", path.display())
}
