//! Registration of many plugins in one write (a load pass registers all
//! its plugins at once): one copy of the map instead of one per plugin,
//! which made registering N plugins quadratic. Same rules and the same
//! observer changes as [`Registry::register`] one by one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::Utc;

use super::{Entry, Inner, Registry, Slot};
use crate::{Change, ChangeKind, PluginInfo, PluginLifecycleState};

impl Registry {
    /// Registers the plugins of `items` in order, as
    /// [`register`](Registry::register) would one by one, in one write (one
    /// copy of the map for all of them, not one per plugin), stopping
    /// before the first whose name is taken (registered, retiring, or
    /// earlier in `items`). Returns how many were registered; observers are
    /// told of each, in order, once all are visible.
    pub fn register_all(&self, items: &[(String, PluginInfo)]) -> usize {
        let observers = self.shared.write.lock();
        let current = self.shared.current.load_full();
        let mut plugins = current.plugins.clone();
        let mut registered = 0;
        for (name, info) in items {
            let name = name.as_str();
            if plugins.contains_key(name) || current.retiring.contains_key(name) {
                break;
            }
            let entry = Entry::new(info.clone(), Utc::now());
            plugins.insert(Arc::from(name), Arc::new(Slot::new(entry)));
            registered += 1;
        }
        if registered == 0 {
            return 0;
        }
        self.shared.current.store(Arc::new(Inner {
            plugins,
            retiring: current.retiring.clone(),
        }));
        for (name, _) in &items[..registered] {
            let generation = self.shared.generation.fetch_add(1, Ordering::Release) + 1;
            if !observers.is_empty() {
                observers.tell(&Change {
                    plugin: name,
                    kind: ChangeKind::Registered,
                    from: None,
                    to: PluginLifecycleState::Loaded,
                    reason: None,
                    restart_count: 0,
                    exit: None,
                    generation,
                });
            }
        }
        registered
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use crate::{Change, ChangeKind, Observer, PluginInfo, PluginLifecycleState, Registry};

    #[derive(Default)]
    struct Seen(Mutex<Vec<(String, ChangeKind, u64)>>);

    impl Observer for Seen {
        fn observe(&self, change: &Change<'_>) {
            if let Ok(mut seen) = self.0.lock() {
                seen.push((change.plugin.to_owned(), change.kind, change.generation));
            }
        }
    }

    fn items(names: &[&str]) -> Vec<(String, PluginInfo)> {
        names
            .iter()
            .map(|n| ((*n).to_owned(), PluginInfo::default()))
            .collect()
    }

    #[test]
    fn registers_in_order_and_stops_before_the_first_taken_name() {
        let registry = Registry::new();
        let seen = Arc::new(Seen::default());
        registry.add_observer(seen.clone());
        registry.register("taken", PluginInfo::default()).unwrap();
        assert_eq!(registry.register_all(&items(&["a", "b", "taken", "c"])), 2);
        assert_eq!(registry.register_all(&items(&["c", "d", "c", "e"])), 2);
        assert_eq!(registry.register_all(&items(&["a"])), 0);
        assert_eq!(registry.register_all(&[]), 0);
        let names: Vec<String> = registry.list_all().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["a", "b", "c", "d", "taken"]);
        for name in ["a", "b", "c", "d"] {
            let status = registry.get_status(name).unwrap();
            assert_eq!(status.state, PluginLifecycleState::Loaded);
        }
        let seen = seen.0.lock().unwrap().clone();
        let told: Vec<&str> = seen.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(told, ["taken", "a", "b", "c", "d"]);
        assert!(seen.iter().all(|(_, k, _)| *k == ChangeKind::Registered));
        let generations: Vec<u64> = seen.iter().map(|(_, _, g)| *g).collect();
        assert!(
            generations.windows(2).all(|w| w[1] == w[0] + 1),
            "{generations:?}"
        );
    }
}
