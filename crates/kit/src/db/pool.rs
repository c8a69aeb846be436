//! The connection pool of a service's [`Db`](super::Db), over sqlx connections of either backend.
//!
//! sqlx's own pool sends the database a round trip each time a connection comes back, because
//! it cannot tell whether a statement was left half-read: at 1M people that check was a fifth
//! of a Get's cost (0.02 ms of PostgreSQL and 0.02 ms of the service per call, and a task spawned
//! for every return). This pool knows how each connection comes back, because every statement
//! runs through [`Conn`]'s executor:
//!
//! - after statements that finished (rows read to the end, or the database's own error), it is
//!   put back at once, with no round trip and no task;
//! - with a statement left unfinished (its future or stream dropped mid-way), it is pinged first
//!   (sqlx's check, now only where it is needed);
//! - inside a transaction never committed, it is rolled back first (see [`Tx`]);
//! - after a failure of the connection itself (I/O, protocol), past [`MAX_LIFETIME`] or once the
//!   pool is closed, it is closed.
//!
//! The most recently returned connection is handed out first, so a light load keeps reusing a
//! few warm connections; one idle for longer than [`IDLE_BEFORE_PING`] is pinged before use (a
//! database restart or a proxy's idle timeout may have ended it), and one idle for
//! [`IDLE_TIMEOUT`] is closed. A connection is opened only when none is idle, never more than
//! the pool's maximum; an acquisition waits its turn (first come, first served) for at most
//! [`ACQUIRE_TIMEOUT`], retrying a refused connect within that time, then fails with
//! `PoolTimedOut` (UNAVAILABLE to callers).

use std::collections::VecDeque;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream};
use futures_util::{Stream, StreamExt, TryFutureExt, TryStreamExt};
use sqlx::any::{AnyConnectOptions, AnyQueryResult, AnyRow, AnyStatement, AnyTypeInfo};
use sqlx::{Any, AnyConnection, ConnectOptions, Connection, Either, Error, Execute, Executor, SqlStr};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::Backend;

/// How long a connection may sit idle and still be handed out without a ping.
pub const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);
/// How long a connection may sit idle before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a connection is used before it is closed (and another opened when needed), so that
/// the database's per-connection caches do not grow without end.
pub const MAX_LIFETIME: Duration = Duration::from_secs(1800);
/// How long an acquisition waits for a connection.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often idle connections are looked over for [`IDLE_TIMEOUT`] and [`MAX_LIFETIME`].
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How long a connection may take to close politely.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of connections to one database. Cloning shares it.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    options: AnyConnectOptions,
    backend: Backend,
    max: u32,
    /// One per connection in use (or being checked, rolled back or opened).
    permits: Arc<Semaphore>,
    /// Connections at rest, the most recently returned last.
    idle: Mutex<VecDeque<Idle>>,
    /// Connections open: at rest, in use, or being checked.
    open: AtomicU32,
    closed: AtomicBool,
    /// Woken each time a connection is closed.
    closing: Notify,
}

struct Idle {
    raw: AnyConnection,
    created: Instant,
    since: Instant,
}

impl Idle {
    /// Whether it has rested for [`IDLE_TIMEOUT`] or lived for [`MAX_LIFETIME`]: to be closed.
    fn stale(&self) -> bool {
        self.since.elapsed() >= IDLE_TIMEOUT || self.created.elapsed() >= MAX_LIFETIME
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("backend", &self.shared.backend)
            .field("max", &self.shared.max)
            .field("open", &self.size())
            .field("idle", &self.num_idle())
            .finish()
    }
}

impl Pool {
    /// A pool of at most `max` connections to `url`; opens one connection to check that the
    /// database answers (within [`ACQUIRE_TIMEOUT`]).
    pub(super) async fn connect(url: &str, backend: Backend, max: u32) -> Result<Pool, Error> {
        let options = AnyConnectOptions::from_str(url)?;
        let max = max.max(1);
        let shared = Arc::new(Shared {
            options,
            backend,
            max,
            permits: Arc::new(Semaphore::new(max as usize)),
            idle: Mutex::new(VecDeque::with_capacity(max as usize)),
            open: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            closing: Notify::new(),
        });
        tokio::spawn(sweep(Arc::downgrade(&shared)));
        let pool = Pool { shared };
        drop(pool.acquire().await?);
        Ok(pool)
    }

    /// A connection of this pool, for several statements in a row (a transaction is
    /// [`Db::begin_write`](super::Db::begin_write)'s). Dropping it gives it back.
    pub async fn acquire(&self) -> Result<Conn, Error> {
        let deadline = tokio::time::Instant::now() + ACQUIRE_TIMEOUT;
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(Error::PoolClosed);
        }
        let permit = match tokio::time::timeout_at(deadline, shared.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(Error::PoolClosed),
            Err(_) => return Err(Error::PoolTimedOut),
        };
        let mut permit = Some(permit);
        loop {
            let Some(idle) = shared.idle.lock().expect("pool lock").pop_back() else { break };
            if idle.stale() {
                shared.close_later(idle.raw);
                continue;
            }
            let mut conn = Conn::new(idle.raw, idle.created, permit.take().expect("a permit"), shared.clone());
            if idle.since.elapsed() > IDLE_BEFORE_PING {
                let (raw, health) = conn.parts();
                *health = Health::Busy;
                if raw.ping().await.is_err() {
                    // Dropped as broken; the permit serves the next one tried.
                    conn.health = Health::Broken;
                    permit = conn.permit.take();
                    continue;
                }
                conn.health = Health::Ready;
            }
            return Ok(conn);
        }
        let raw = shared.open_connection(deadline).await?;
        Ok(Conn::new(raw, Instant::now(), permit.take().expect("a permit"), shared.clone()))
    }

    /// Connections open (at rest or in use).
    pub fn size(&self) -> u32 {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Connections at rest.
    pub fn num_idle(&self) -> usize {
        self.shared.idle.lock().expect("pool lock").len()
    }

    /// The most connections this pool opens.
    pub fn max_connections(&self) -> u32 {
        self.shared.max
    }

    /// Refuses further acquisitions, closes the connections at rest, and waits until every
    /// connection in use has come back and been closed.
    pub async fn close(&self) {
        let shared = &self.shared;
        let idle: Vec<Idle> = {
            let mut idle = shared.idle.lock().expect("pool lock");
            shared.closed.store(true, Ordering::Release);
            idle.drain(..).collect()
        };
        shared.permits.close();
        for idle in idle {
            shared.close_now(idle.raw).await;
        }
        loop {
            let closed = shared.closing.notified();
            if shared.open.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Shared {
    async fn open_connection(&self, deadline: tokio::time::Instant) -> Result<AnyConnection, Error> {
        let mut backoff = Duration::from_millis(10);
        loop {
            let attempt = async {
                let mut raw = self.options.connect().await?;
                super::prepare_connection(self.backend, &mut raw).await?;
                Ok::<_, Error>(raw)
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(raw)) => {
                    self.open.fetch_add(1, Ordering::AcqRel);
                    return Ok(raw);
                }
                // The server refuses connections for now (not listening yet, starting up, too
                // many clients): try again until the deadline, as a call would rather wait out a
                // database restart than fail at once. Anything else (a wrong password, an
                // unknown database) fails at once.
                Ok(Err(err)) if refused_for_now(&err) => {
                    if tokio::time::Instant::now() + backoff >= deadline {
                        return Err(err);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Ok(Err(err)) => return Err(err),
                Err(_) => return Err(Error::PoolTimedOut),
            }
        }
    }

    /// Closes `raw` politely (the server learns at once that it went).
    async fn close_now(&self, raw: AnyConnection) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, raw.close()).await;
        self.gone();
    }

    fn close_later(self: &Arc<Self>, raw: AnyConnection) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let shared = self.clone();
                runtime.spawn(async move { shared.close_now(raw).await });
            }
            Err(_) => self.forget(raw),
        }
    }

    /// Drops a connection that failed (its socket closes with it).
    fn forget(&self, raw: AnyConnection) {
        drop(raw);
        self.gone();
    }

    fn gone(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.closing.notify_waiters();
    }

    /// Puts `raw` at rest, unless the pool is closed: then it is given back to be closed. (The
    /// check is made under the lock that [`Pool::close`] takes to set the flag and empty the
    /// pool, so no connection is left at rest in a closed pool.)
    fn put_back(&self, raw: AnyConnection, created: Instant) -> Option<AnyConnection> {
        let mut idle = self.idle.lock().expect("pool lock");
        if self.closed.load(Ordering::Acquire) {
            return Some(raw);
        }
        idle.push_back(Idle { raw, created, since: Instant::now() });
        None
    }

    /// Takes back a connection whose state is unsure: rolls back a transaction left open, or
    /// pings one left mid-statement, and keeps it only if that succeeds.
    async fn recover(self: Arc<Self>, mut raw: AnyConnection, created: Instant, roll_back: bool) {
        let recovered = if roll_back { raw.execute("ROLLBACK").await.map(|_| ()) } else { raw.ping().await };
        match recovered {
            Ok(()) => {
                if let Some(raw) = self.put_back(raw, created) {
                    self.close_now(raw).await;
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "a database connection came back unusable; closing it");
                self.forget(raw);
            }
        }
    }
}

/// Whether a connect failed for a reason that may pass: the server not listening (restarting),
/// or answering SQLSTATE 57P03 (starting up) or 53300 (too many connections).
fn refused_for_now(err: &Error) -> bool {
    match err {
        Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
        Error::Database(db) => matches!(db.code().as_deref(), Some("57P03" | "53300")),
        _ => false,
    }
}

/// Closes, every [`SWEEP_EVERY`], the connections at rest for [`IDLE_TIMEOUT`] or open for
/// [`MAX_LIFETIME`]; ends with the pool.
async fn sweep(shared: Weak<Shared>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let stale: VecDeque<Idle> = {
            let mut idle = shared.idle.lock().expect("pool lock");
            let (stale, keep): (VecDeque<Idle>, VecDeque<Idle>) = idle.drain(..).partition(Idle::stale);
            *idle = keep;
            stale
        };
        for idle in stale {
            shared.close_now(idle.raw).await;
        }
    }
}

/// What is known of a connection in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Every statement run on it finished.
    Ready,
    /// A statement was started and not seen to finish.
    Busy,
    /// The connection itself failed.
    Broken,
}

impl Health {
    /// After a statement failed with `err`: the database's own error about the statement (a
    /// constraint, a serialization failure) leaves the connection usable; one about the
    /// connection (SQLSTATE class 08, or 57P: the server ended it, is shutting down or
    /// restarting) and anything else (I/O, protocol) may not have.
    fn after(err: &Error) -> Health {
        match err {
            Error::Database(db) => match db.code() {
                Some(code) if code.starts_with("08") || code.starts_with("57P") => Health::Broken,
                _ => Health::Ready,
            },
            _ => Health::Broken,
        }
    }
}

/// A connection taken from a [`Pool`]: an [`Executor`] (`&mut conn`) that keeps track of how
/// its statements ended. Dropping it gives it back.
pub struct Conn {
    raw: Option<AnyConnection>,
    created: Instant,
    health: Health,
    in_transaction: bool,
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").field("health", &self.health).field("in_transaction", &self.in_transaction).finish()
    }
}

impl Conn {
    fn new(raw: AnyConnection, created: Instant, permit: OwnedSemaphorePermit, shared: Arc<Shared>) -> Conn {
        Conn { raw: Some(raw), created, health: Health::Ready, in_transaction: false, permit: Some(permit), shared }
    }

    /// The sqlx connection itself, for what needs one (the migrator). Whatever is done with it
    /// is not tracked, so the connection is checked when it comes back.
    pub fn raw(&mut self) -> &mut AnyConnection {
        self.health = Health::Busy;
        self.raw.as_mut().expect("a connection in use")
    }

    fn parts(&mut self) -> (&mut AnyConnection, &mut Health) {
        (self.raw.as_mut().expect("a connection in use"), &mut self.health)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(raw) = self.raw.take() else { return };
        let permit = self.permit.take();
        let shared = &self.shared;
        if self.health == Health::Broken {
            shared.forget(raw);
            return;
        }
        if self.created.elapsed() >= MAX_LIFETIME {
            shared.close_later(raw);
            return;
        }
        if self.health == Health::Ready && !self.in_transaction {
            // Back at rest before the permit goes, so that the next in line finds it.
            if let Some(raw) = shared.put_back(raw, self.created) {
                shared.close_later(raw);
            }
            drop(permit);
            return;
        }
        let (created, roll_back) = (self.created, self.in_transaction);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let shared = shared.clone();
                runtime.spawn(async move {
                    shared.recover(raw, created, roll_back).await;
                    drop(permit);
                });
            }
            Err(_) => shared.forget(raw),
        }
    }
}

/// A stream of a statement's results that records, on `health`, how the statement ended.
struct Tracked<'e, T> {
    inner: BoxStream<'e, Result<T, Error>>,
    health: &'e mut Health,
}

impl<T> Stream for Tracked<'_, T> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let next = this.inner.poll_next_unpin(cx);
        match &next {
            Poll::Ready(None) if *this.health == Health::Busy => *this.health = Health::Ready,
            Poll::Ready(Some(Err(err))) => *this.health = Health::after(err),
            _ => {}
        }
        next
    }
}

impl<'c> Executor<'c> for &'c mut Conn {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        let (raw, health) = self.parts();
        *health = Health::Busy;
        Box::pin(Tracked { inner: raw.fetch_many(query), health })
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Option<AnyRow>, Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        let (raw, health) = self.parts();
        *health = Health::Busy;
        tracked(health, raw.fetch_optional(query))
    }

    fn prepare_with<'e>(self, sql: SqlStr, parameters: &'e [AnyTypeInfo]) -> BoxFuture<'e, Result<AnyStatement, Error>>
    where
        'c: 'e,
    {
        let (raw, health) = self.parts();
        *health = Health::Busy;
        tracked(health, raw.prepare_with(sql, parameters))
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<sqlx::Describe<Any>, Error>>
    where
        'c: 'e,
    {
        let (raw, health) = self.parts();
        *health = Health::Busy;
        tracked(health, raw.describe(sql))
    }
}

/// `statement`, recording on `health` how it ended once it has.
fn tracked<'e, T: Send + 'e>(
    health: &'e mut Health,
    statement: BoxFuture<'e, Result<T, Error>>,
) -> BoxFuture<'e, Result<T, Error>> {
    Box::pin(async move {
        let result = statement.await;
        *health = match &result {
            Ok(_) => Health::Ready,
            Err(err) => Health::after(err),
        };
        result
    })
}

/// A statement run on the pool takes a connection for itself and gives it back when done. A
/// stream of rows (`fetch`, `fetch_many`) is read to its end before its first row is yielded:
/// listings here are pages, never a whole table.
impl<'p> Executor<'p> for &'_ Pool {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Any>,
    {
        let pool = self.clone();
        let all = async move {
            let mut conn = pool.acquire().await?;
            (&mut conn).fetch_many(query).try_collect::<Vec<_>>().await
        };
        all.map_ok(|results| stream::iter(results.into_iter().map(Ok))).try_flatten_stream().boxed()
    }

    fn fetch_all<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Vec<AnyRow>, Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Any>,
    {
        let pool = self.clone();
        Box::pin(async move { (&mut pool.acquire().await?).fetch_all(query).await })
    }

    fn execute<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<AnyQueryResult, Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Any>,
    {
        let pool = self.clone();
        Box::pin(async move { (&mut pool.acquire().await?).execute(query).await })
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Option<AnyRow>, Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Any>,
    {
        let pool = self.clone();
        Box::pin(async move { (&mut pool.acquire().await?).fetch_optional(query).await })
    }

    fn prepare_with<'e>(self, sql: SqlStr, parameters: &'e [AnyTypeInfo]) -> BoxFuture<'e, Result<AnyStatement, Error>>
    where
        'p: 'e,
    {
        let pool = self.clone();
        Box::pin(async move { (&mut pool.acquire().await?).prepare_with(sql, parameters).await })
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<sqlx::Describe<Any>, Error>>
    where
        'p: 'e,
    {
        let pool = self.clone();
        Box::pin(async move { (&mut pool.acquire().await?).describe(sql).await })
    }
}

/// A transaction on one connection of the pool: statements run on `&mut *tx` (or `&mut **tx`
/// through a `&mut Tx`). Dropped without [`Tx::commit`], it is rolled back before its
/// connection is used again.
#[derive(Debug)]
pub struct Tx {
    conn: Conn,
}

impl Tx {
    /// Starts a transaction on `conn` with `begin` (`BEGIN`, `BEGIN IMMEDIATE`…).
    pub(super) async fn begin(mut conn: Conn, begin: &'static str) -> Result<Tx, Error> {
        // Marked first: a BEGIN whose future is dropped may still have reached the database.
        conn.in_transaction = true;
        if let Err(err) = (&mut conn).execute(begin).await {
            // A BEGIN the database refused (SQLite busy, a server shutting down) opened nothing.
            conn.in_transaction = false;
            return Err(err);
        }
        Ok(Tx { conn })
    }

    /// Commits. If the commit fails the transaction is rolled back (SQLite keeps a transaction
    /// whose COMMIT found the database busy; PostgreSQL has already ended it).
    pub async fn commit(mut self) -> Result<(), Error> {
        (&mut self.conn).execute("COMMIT").await?;
        self.conn.in_transaction = false;
        Ok(())
    }

    pub async fn rollback(mut self) -> Result<(), Error> {
        (&mut self.conn).execute("ROLLBACK").await?;
        self.conn.in_transaction = false;
        Ok(())
    }
}

impl Deref for Tx {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}
