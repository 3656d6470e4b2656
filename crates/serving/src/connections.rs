//! What every listener's connection bounds share, knowing neither hyper nor a protocol: the
//! limits, each connection's requests in flight (and since when it has been idle), and the
//! registry of open connections that makes room for a newcomer by closing the longest-idle one.
//! `sdserve-http` serves HTTP/1.1 and HTTP/2 within them, `sdserve-grpc` gRPC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionLimits {
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request in flight.
    pub keep_alive_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            max_connections: 2048,
        }
    }
}

/// Requests in flight on one connection, and when that count last changed.
#[derive(Clone)]
pub struct Activity(watch::Sender<(usize, Instant)>);

impl Default for Activity {
    fn default() -> Self {
        Self(watch::Sender::new((0, Instant::now())))
    }
}

impl Activity {
    /// A request starts; it counts until the returned guard is dropped.
    pub fn begin(&self) -> InFlight {
        self.0.send_modify(|(n, at)| {
            *n += 1;
            *at = Instant::now();
        });
        InFlight(self.clone())
    }

    /// Since when the connection has had no request in flight; `None` while it has one.
    pub fn idle_since(&self) -> Option<Instant> {
        let (n, at) = *self.0.borrow();
        (n == 0).then_some(at)
    }

    /// Completes once the connection has had no request in flight for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        let mut changes = self.0.subscribe();
        loop {
            let (n, at) = *changes.borrow_and_update();
            if n > 0 {
                let _ = changes.changed().await;
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(at + timeout) => return,
                _ = changes.changed() => {}
            }
        }
    }

    /// Completes when `flag` is set and the connection has no request in flight (an eviction
    /// never cuts a request: a connection that became busy meanwhile waits for it to finish).
    pub async fn idle_once_set(&self, flag: &mut watch::Receiver<bool>) {
        let _ = flag.wait_for(|s| *s).await;
        self.idle_for(Duration::ZERO).await;
    }
}

/// One request in flight, until dropped.
pub struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.0.send_modify(|(n, at)| {
            *n = n.saturating_sub(1);
            *at = Instant::now();
        });
    }
}

/// One open connection as its server sees it: its activity and the flag that asks it to close.
pub struct Slot {
    pub activity: Activity,
    /// Set when the connection must make room for a newer one.
    pub close: watch::Receiver<bool>,
    id: u64,
    registry: Registry,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.lock().open.remove(&self.id);
    }
}

#[derive(Default)]
struct Open {
    next_id: u64,
    open: HashMap<u64, (Activity, watch::Sender<bool>)>,
}

/// The open connections of one listener.
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<Open>>);

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new connection: at once, or by asking the longest-idle connection to
    /// close; `None` when all `max` are busy with requests.
    pub fn admit(&self, max: usize) -> Option<Slot> {
        let mut r = self.lock();
        if r.open.len() >= max {
            let oldest = r
                .open
                .values()
                // One already asked to close is on its way out.
                .filter(|(_, close)| !*close.borrow())
                .filter_map(|(activity, close)| activity.idle_since().map(|at| (at, close)))
                .min_by_key(|(at, _)| *at)?;
            let _ = oldest.1.send(true);
        }
        let id = r.next_id;
        r.next_id += 1;
        let activity = Activity::default();
        let (close_tx, close) = watch::channel(false);
        r.open.insert(id, (activity.clone(), close_tx));
        Some(Slot {
            activity,
            close,
            id,
            registry: self.clone(),
        })
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_registry_evicts_the_longest_idle_and_refuses_when_all_are_busy() {
        let r = Registry::default();
        let mut first = r.admit(2).unwrap();
        let second = r.admit(2).unwrap();
        let busy = second.activity.begin();
        // Full: the idle first connection is asked to close and the newcomer gets its room.
        let third = r.admit(2).unwrap();
        assert!(*first.close.borrow_and_update());
        drop(first);
        assert_eq!(r.len(), 2);
        let _also_busy = third.activity.begin();
        assert!(r.admit(2).is_none(), "every connection is busy");
        drop(busy);
        assert!(r.admit(2).is_some(), "the second is idle again");
    }
}
