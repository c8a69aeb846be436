//! The cluster transport: Redis Streams. One stream per producing service
//! (`crm:events:<source>`), entry ids `0-<seq>` (the relay's publication number, so that a
//! stream rebuilt after Redis lost its data has the same numbering), one consumer group per
//! consuming service.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamInfoGroupsReply, StreamPendingReply, StreamReadReply};
use redis::{Client, RedisError, Value};

use crate::role::Error;

/// The field of a stream entry holding the encoded envelope.
const FIELD: &str = "e";

/// A Redis server the process talks to; connections are made (and remade) on use.
#[derive(Clone)]
pub(crate) struct Bus {
    client: Client,
    conn: ConnectionManager,
}

impl Bus {
    pub(crate) fn new(url: &str) -> Result<Bus, Error> {
        let client = Client::open(url).map_err(|e| format!("--redis-url: {e}"))?;
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config(Duration::from_secs(5)))
            .map_err(|e| format!("--redis-url: {e}"))?;
        Ok(Bus { client, conn })
    }

    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// The shared connection (commands that answer at once).
    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// A connection of its own, for commands that block up to `block`.
    pub(crate) fn blocking(&self, block: Duration) -> Result<ConnectionManager, RedisError> {
        ConnectionManager::new_lazy_with_config(self.client.clone(), config(block + Duration::from_secs(5)))
    }
}

fn config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
}

pub(crate) fn entry_id(seq: i64) -> String {
    format!("0-{seq}")
}

/// The publication number of an entry id (`0-<seq>`).
pub(crate) fn seq_of(id: &str) -> Option<i64> {
    id.split_once('-').and_then(|(_, seq)| seq.parse().ok())
}

/// Adds the entries `(seq, envelope)` in one atomic round trip. Refused by Redis (and nothing
/// added) when a number is not above the stream's last.
pub(crate) async fn publish(
    conn: &mut ConnectionManager,
    key: &str,
    entries: &[(i64, Vec<u8>)],
) -> Result<(), RedisError> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (seq, envelope) in entries {
        pipe.cmd("XADD").arg(key).arg(entry_id(*seq)).arg(FIELD).arg(envelope.as_slice()).ignore();
    }
    pipe.query_async::<()>(conn).await
}

/// The stream's last entry number (0 when it has none or does not exist).
pub(crate) async fn last_seq(conn: &mut ConnectionManager, key: &str) -> Result<i64, RedisError> {
    let reply: Value = redis::cmd("XREVRANGE").arg(key).arg("+").arg("-").arg("COUNT").arg(1).query_async(conn).await?;
    let ids: Vec<StreamId> = match redis::from_redis_value::<redis::streams::StreamRangeReply>(reply) {
        Ok(range) => range.ids,
        Err(_) => Vec::new(),
    };
    Ok(ids.first().and_then(|e| seq_of(&e.id)).unwrap_or(0))
}

pub(crate) fn is_id_too_small(err: &RedisError) -> bool {
    err.to_string().contains("equal or smaller")
}

pub(crate) fn is_no_group(err: &RedisError) -> bool {
    err.code() == Some("NOGROUP")
}

/// How far one consumer group is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupState {
    pub(crate) name: String,
    /// Entries delivered to none of its consumers yet.
    pub(crate) lag: i64,
    /// Entries delivered and not acknowledged.
    pub(crate) pending: i64,
    /// Every entry below this number is acknowledged.
    pub(crate) acked_below: i64,
}

/// The consumer groups of the stream `key`; `None` when the stream does not exist.
pub(crate) async fn groups(conn: &mut ConnectionManager, key: &str) -> Result<Option<Vec<GroupState>>, RedisError> {
    let reply: Result<StreamInfoGroupsReply, RedisError> =
        redis::cmd("XINFO").arg("GROUPS").arg(key).query_async(conn).await;
    let reply = match reply {
        Ok(reply) => reply,
        Err(err) if err.to_string().contains("no such key") => return Ok(None),
        Err(err) => return Err(err),
    };
    let mut states = Vec::with_capacity(reply.groups.len());
    for group in reply.groups {
        let delivered = seq_of(&group.last_delivered_id).unwrap_or(0);
        let mut acked_below = delivered + 1;
        if group.pending > 0 {
            let pending: StreamPendingReply =
                redis::cmd("XPENDING").arg(key).arg(&group.name).query_async(conn).await?;
            if let StreamPendingReply::Data(data) = pending {
                acked_below = acked_below.min(seq_of(&data.start_id).unwrap_or(acked_below));
            }
        }
        states.push(GroupState {
            name: group.name,
            lag: group.lag.unwrap_or(0) as i64,
            pending: group.pending as i64,
            acked_below,
        });
    }
    Ok(Some(states))
}

/// Creates the group `group` reading `key` from its first entry (and the stream, if missing).
pub(crate) async fn create_group(conn: &mut ConnectionManager, key: &str, group: &str) -> Result<(), RedisError> {
    let result: Result<(), RedisError> =
        redis::cmd("XGROUP").arg("CREATE").arg(key).arg(group).arg("0").arg("MKSTREAM").query_async(conn).await;
    match result {
        Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Drops entries below `seq` (which every group has acknowledged).
pub(crate) async fn trim_below(conn: &mut ConnectionManager, key: &str, seq: i64) -> Result<(), RedisError> {
    redis::cmd("XTRIM").arg(key).arg("MINID").arg(entry_id(seq)).query_async::<i64>(conn).await.map(|_| ())
}

/// An entry as a consumer gets it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) id: String,
    pub(crate) envelope: Option<Vec<u8>>,
}

fn entries_of(key: &str, ids: Vec<StreamId>) -> Vec<Entry> {
    ids.into_iter()
        .map(|e| {
            let envelope = e.map.get(FIELD).and_then(|v| redis::from_redis_value_ref::<Vec<u8>>(v).ok());
            Entry { key: key.to_string(), id: e.id, envelope }
        })
        .collect()
}

/// New entries for `consumer` of `group` from `keys`, waiting up to `block`.
pub(crate) async fn read_group(
    conn: &mut ConnectionManager,
    group: &str,
    consumer: &str,
    keys: &[String],
    count: usize,
    block: Duration,
) -> Result<Vec<Entry>, RedisError> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(group).arg(consumer).arg("COUNT").arg(count);
    cmd.arg("BLOCK").arg(block.as_millis() as u64).arg("STREAMS");
    for key in keys {
        cmd.arg(key);
    }
    for _ in keys {
        cmd.arg(">");
    }
    let reply: Option<StreamReadReply> = cmd.query_async(conn).await?;
    Ok(reply.map(|r| r.keys.into_iter().flat_map(|k| entries_of(&k.key, k.ids)).collect()).unwrap_or_default())
}

/// Entries of `key` pending longer than `idle` with any consumer of `group`, now `consumer`'s;
/// also the ids of pending entries the stream no longer has.
pub(crate) async fn claim(
    conn: &mut ConnectionManager,
    key: &str,
    group: &str,
    consumer: &str,
    idle: Duration,
    count: usize,
) -> Result<(Vec<Entry>, Vec<String>), RedisError> {
    let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(key)
        .arg(group)
        .arg(consumer)
        .arg(idle.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    Ok((entries_of(key, reply.claimed), reply.deleted_ids))
}

pub(crate) async fn ack<S: AsRef<str>>(
    conn: &mut ConnectionManager,
    key: &str,
    group: &str,
    ids: &[S],
) -> Result<(), RedisError> {
    if ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = ids.iter().map(AsRef::as_ref).collect();
    let ids: Vec<&str> = ids.iter().map(AsRef::as_ref).collect();
    redis::cmd("XACK").arg(key).arg(group).arg(ids).query_async::<i64>(conn).await.map(|_| ())
}

/// Entries of `key` after `after` (a stream id), waiting up to `block` (no group: listeners).
pub(crate) async fn read_after(
    conn: &mut ConnectionManager,
    key: &str,
    after: &str,
    count: usize,
    block: Duration,
) -> Result<Vec<Entry>, RedisError> {
    let reply: Option<StreamReadReply> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(key)
        .arg(after)
        .query_async(conn)
        .await?;
    Ok(reply.map(|r| r.keys.into_iter().flat_map(|k| entries_of(&k.key, k.ids)).collect()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_are_publication_numbers() {
        assert_eq!(entry_id(42), "0-42");
        assert_eq!(seq_of("0-42"), Some(42));
        assert_eq!(seq_of("garbage"), None);
    }
}
