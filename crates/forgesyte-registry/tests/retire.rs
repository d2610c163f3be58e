//! Retirement ([`Registry::retire`]): a retired plugin is gone from every
//! read and refuses new calls at once, while the calls in flight still end
//! on it; [`Registry::forget`] frees its name.

// Helpers outside #[test] functions may fail loudly too: this is test code.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use forgesyte_registry::{PluginInfo, PluginLifecycleState, Registry, RegistryError};

fn running(name: &str) -> Registry {
    let registry = Registry::new();
    registry.register(name, PluginInfo::default()).unwrap();
    registry.register("other", PluginInfo::default()).unwrap();
    registry.mark_initialized(name).unwrap();
    registry.mark_running(name).unwrap();
    registry
}

#[test]
fn a_retired_plugin_is_invisible_refuses_calls_and_counts_its_calls_in_flight() {
    let registry = running("slow");
    let before = registry.generation();
    registry.retire("slow").unwrap();
    assert!(registry.generation() > before);
    assert_eq!(registry.get_status("slow"), None);
    assert_eq!(registry.get_state("slow"), None);
    assert!(!registry.contains("slow"));
    assert!(!registry.snapshot().contains("slow"));
    assert_eq!(registry.list_all().len(), 1);
    assert_eq!(registry.len(), 1);
    assert_eq!(
        registry.mark_running("slow"),
        Err(RegistryError::NotFound {
            name: "slow".into()
        })
    );
    assert_eq!(registry.retiring_in_flight("slow"), Some(1));
    assert_eq!(registry.retiring_in_flight("other"), None);
    // The call in flight ends on the retired entry.
    registry
        .end_call("slow", Duration::from_millis(3), true)
        .unwrap();
    assert_eq!(registry.retiring_in_flight("slow"), Some(0));
    // Still retiring: the name is not free yet.
    assert_eq!(
        registry.register("slow", PluginInfo::default()),
        Err(RegistryError::AlreadyRegistered {
            name: "slow".into()
        })
    );
    assert!(registry.forget("slow"));
    assert!(!registry.forget("slow"));
    assert_eq!(registry.retiring_in_flight("slow"), None);
    registry.register("slow", PluginInfo::default()).unwrap();
    assert_eq!(
        registry.get_state("slow"),
        Some(PluginLifecycleState::Loaded)
    );
    // Other plugins never noticed.
    assert_eq!(
        registry.get_state("other"),
        Some(PluginLifecycleState::Loaded)
    );
}

#[test]
fn retiring_an_unknown_plugin_is_not_found() {
    let registry = Registry::new();
    assert_eq!(
        registry.retire("nope"),
        Err(RegistryError::NotFound {
            name: "nope".into()
        })
    );
    assert!(!registry.forget("nope"));
}
