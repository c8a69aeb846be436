//! Live inboxes: what wakes a `Subscribe` stream. Every replica hears every new notification
//! (its own `NotificationCreated` events, through the backbone's listener) and wakes the
//! streams of that recipient it holds; the stream then reads the inbox after the last number it
//! sent, so the database, not the signal, decides what is sent — a missed signal only delays
//! (streams also look on their own every few seconds), it never loses or repeats anything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The recipients with open streams in this process, and the signal that closes them all.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    users: Mutex<HashMap<String, watch::Sender<i64>>>,
    closed: watch::Sender<bool>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let users = self.inner.users.lock().map(|u| u.len()).unwrap_or_default();
        f.debug_struct("Hub").field("recipients", &users).finish()
    }
}

/// One stream's view: woken when its recipient gets a notification, or when the process stops.
pub struct Watch {
    hub: Hub,
    recipient: String,
    pub changed: watch::Receiver<i64>,
    pub closed: watch::Receiver<bool>,
}

impl Hub {
    pub fn new() -> Hub {
        let (closed, _) = watch::channel(false);
        Hub { inner: Arc::new(Inner { users: Mutex::new(HashMap::new()), closed }) }
    }

    /// `recipient` has a notification numbered `seq`.
    pub fn announce(&self, recipient: &str, seq: i64) {
        let users = self.inner.users.lock().expect("hub lock");
        if let Some(sender) = users.get(recipient) {
            sender.send_if_modified(|last| {
                let newer = seq > *last;
                if newer {
                    *last = seq;
                }
                newer
            });
        }
    }

    /// Watches `recipient`'s inbox.
    pub fn watch(&self, recipient: &str) -> Watch {
        let changed = {
            let mut users = self.inner.users.lock().expect("hub lock");
            users.entry(recipient.to_string()).or_insert_with(|| watch::channel(0).0).subscribe()
        };
        let closed = self.inner.closed.subscribe();
        Watch { hub: self.clone(), recipient: recipient.to_string(), changed, closed }
    }

    /// Ends every stream (the process is stopping): subscribers reconnect elsewhere.
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    /// How many recipients have open streams here.
    pub fn recipients(&self) -> usize {
        self.inner.users.lock().expect("hub lock").len()
    }
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::new()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut users = self.hub.inner.users.lock().expect("hub lock");
        // This watch's receiver still counts: the last one leaving removes the entry.
        if users.get(&self.recipient).is_some_and(|s| s.receiver_count() <= 1) {
            users.remove(&self.recipient);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn announcements_wake_only_their_recipient_and_entries_go_with_their_last_watch() {
        let hub = Hub::new();
        let mut anna = hub.watch("anna");
        let mut boris = hub.watch("boris");
        hub.announce("anna", 3);
        assert!(anna.changed.has_changed().unwrap());
        assert!(!boris.changed.has_changed().unwrap());
        assert_eq!(*anna.changed.borrow_and_update(), 3);
        hub.announce("anna", 2);
        assert!(!anna.changed.has_changed().unwrap(), "an older number wakes nobody");
        let second = hub.watch("anna");
        assert_eq!(hub.recipients(), 2);
        drop(second);
        assert_eq!(hub.recipients(), 2);
        drop(anna);
        assert_eq!(hub.recipients(), 1);
        hub.close();
        boris.closed.changed().await.unwrap();
        assert!(*boris.closed.borrow());
    }
}
