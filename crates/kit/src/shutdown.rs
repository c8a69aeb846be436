//! Graceful shutdown: one trigger, any number of waiters (mini-redis style: servers take the
//! shutdown as a future).

use tokio::sync::watch;

/// Fires the shutdown.
#[derive(Debug, Clone)]
pub struct Trigger(watch::Sender<bool>);

/// Resolves once the shutdown has been triggered.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    pub async fn wait(mut self) {
        // An error means every trigger is gone, which also means: stop.
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }
}

/// Waits for ctrl-c or SIGTERM.
pub async fn os_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c received, shutting down"),
        _ = term => tracing::info!("SIGTERM received, draining in-flight calls"),
    }
}

/// A shutdown that fires on ctrl-c or SIGTERM.
pub fn on_os_signal() -> (Trigger, Shutdown) {
    let (trigger, shutdown) = channel();
    let t = trigger.clone();
    tokio::spawn(async move {
        os_signal().await;
        t.fire();
    });
    (trigger, shutdown)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn waiters_wake_on_fire() {
        let (trigger, shutdown) = super::channel();
        let waiter = tokio::spawn(shutdown.clone().wait());
        assert!(!shutdown.is_fired());
        trigger.fire();
        waiter.await.unwrap();
        assert!(shutdown.is_fired());
        shutdown.wait().await;
    }
}
