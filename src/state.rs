//! What replicas share in Redis (`state: redis://…`): the rate limits' buckets, from which each
//! replica takes tokens in small leases, and the failure throttle's counts and blocks.
//!
//! Invariants: authentication never depends on Redis: while it cannot be reached, limits and
//! the throttle count per replica (logged once, shown by `/health` and `portcullis_state_up`),
//! and no request waits longer than [`DEADLINE`] on it; no credential value is written to Redis
//! (keys carry identity keys, which are names, lineages and issuer subjects, and client
//! addresses); the bucket in Redis is the one that decides, so while Redis answers, N replicas
//! together admit no more than the limit (a lease can only make a replica refuse early: see
//! `docs/scale-out.md`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;

use crate::credentials::{FailureLimit, Rate};

/// The longest a request waits on Redis (then it goes on with the per-replica count).
pub(crate) const DEADLINE: Duration = Duration::from_millis(250);
/// How often a lost Redis is tried again.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);
/// How often a quiet connection is checked (a Redis that stopped is noticed within this).
const PING_EVERY: Duration = Duration::from_secs(1);

/// Where the shared state lives, as configured.
#[derive(Clone, PartialEq, Eq)]
pub struct StateLocation {
    /// `redis://[user:password@]host[:port][/db]`.
    pub url: String,
    /// Prefix of every key and channel (several deployments can share one Redis).
    pub prefix: String,
}

impl std::fmt::Debug for StateLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for StateLocation {
    /// The URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = &self.url;
        let Some(start) = url.find("://").map(|i| i + 3) else { return f.write_str("redis://(unreadable URL)") };
        let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
        match url[start..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &url[start..start + at];
                let user = userinfo.split(':').next().unwrap_or("");
                write!(f, "{}{user}:***{}", &url[..start], &url[start + at..])
            }
            None => f.write_str(url),
        }
    }
}

/// Why Redis did not answer.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not connected, or the call failed or ran out of time.
    #[error("the shared state (Redis) is unavailable: {0}")]
    Unavailable(String),
}

/// Tokens granted from a shared bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    /// How many (0: the bucket is empty).
    pub granted: u32,
    /// When none: how long until one is there.
    pub wait: Duration,
}

/// Takes tokens from (or, with a negative count, returns tokens to) a token bucket kept in a
/// hash `{tokens, at}`, on the Redis server's clock, so replicas' clocks do not matter.
const TAKE: &str = r"
local cap = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(v[1])
local at = tonumber(v[2])
if tokens == nil or at == nil then tokens = cap; at = now end
local rate = cap / period
if now > at then tokens = math.min(cap, tokens + (now - at) * rate); at = now end
local granted = 0
if want < 0 then
  tokens = math.min(cap, tokens - want)
else
  granted = math.min(want, math.floor(tokens))
  tokens = tokens - granted
end
local wait = 0
if granted == 0 and want > 0 then wait = math.ceil((1 - tokens) / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', at)
redis.call('PEXPIRE', KEYS[1], math.ceil((cap - tokens) / rate) + 1000)
return {granted, wait}
";

/// Counts one failure from an address; the block's remaining milliseconds when it is (or now
/// becomes) blocked, else 0. KEYS: the count, the block; ARGV: max, window ms, block ms.
const FAIL: &str = r"
local blocked = redis.call('PTTL', KEYS[2])
if blocked > 0 then return blocked end
local c = redis.call('INCR', KEYS[1])
if c == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if c > tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return tonumber(ARGV[3])
end
return 0
";

/// A process's connection to the shared state, kept up by a task of its own.
pub(crate) struct SharedState {
    at: StateLocation,
    client: redis::Client,
    conn: ArcSwapOption<MultiplexedConnection>,
    up: AtomicBool,
    /// The same, for waiting on a change.
    up_changes: tokio::sync::watch::Sender<bool>,
    lost: tokio::sync::Notify,
    take: redis::Script,
    fail: redis::Script,
    /// Messages to publish, in order (a full queue drops, as a full stream does).
    publish: tokio::sync::mpsc::Sender<(String, bytes::Bytes)>,
    /// Who hears each subscribed channel here (an id per subscription, so a replaced one's end
    /// does not remove its successor).
    heard: std::sync::Mutex<std::collections::HashMap<String, (u64, tokio::sync::mpsc::Sender<bytes::Bytes>)>>,
    /// This process among the replicas (32 random bits, never 0): server-to-client request ids
    /// it gives carry it, so an answer that lands elsewhere is sent back here.
    tag: u64,
    /// Subscribe (true) or unsubscribe a channel on the listening connection, and whom to
    /// tell once Redis confirmed.
    listen: tokio::sync::mpsc::UnboundedSender<ListenChange>,
}

/// A change to what the listening connection hears.
type ListenChange = (String, bool, Option<tokio::sync::oneshot::Sender<()>>);

/// Messages published on one channel, heard here while this lives.
pub(crate) struct Subscription {
    pub rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    /// Answered once Redis confirmed the subscription (dropped when it could not).
    pub ready: Option<tokio::sync::oneshot::Receiver<()>>,
    channel: String,
    id: u64,
    state: Weak<SharedState>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(state) = self.state.upgrade() else { return };
        let mut heard = crate::sharded::lock(&state.heard);
        if heard.get(&self.channel).is_some_and(|(id, _)| *id == self.id) {
            heard.remove(&self.channel);
            let _ = state.listen.send((std::mem::take(&mut self.channel), false, None));
        }
    }
}

/// Messages one replica may have waiting to be published.
const PUBLISH_QUEUE: usize = 4096;

impl SharedState {
    /// Connects in the background (requests go on per replica until it is reached). An error
    /// only for a URL the Redis client cannot read.
    pub(crate) fn start(at: &StateLocation) -> Result<Arc<Self>, StateError> {
        // The kind only: the client's message can quote the URL.
        let client =
            redis::Client::open(at.url.as_str()).map_err(|e| StateError::Unavailable(format!("{:?}", e.kind())))?;
        let (publish, published) = tokio::sync::mpsc::channel(PUBLISH_QUEUE);
        let (listen, listens) = tokio::sync::mpsc::unbounded_channel();
        let tag = crate::random::key()
            .map(|k| u64::from(u32::from_be_bytes([k[0], k[1], k[2], k[3]])).max(1))
            .map_err(|e| StateError::Unavailable(e.to_string()))?;
        let state = Arc::new(SharedState {
            tag,
            publish,
            heard: std::sync::Mutex::default(),
            listen,
            at: at.clone(),
            client,
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            up_changes: tokio::sync::watch::Sender::new(false),
            lost: tokio::sync::Notify::new(),
            take: redis::Script::new(TAKE),
            fail: redis::Script::new(FAIL),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(keep_connected(Arc::downgrade(&state)));
            rt.spawn(publish_all(Arc::downgrade(&state), published));
            rt.spawn(keep_listening(Arc::downgrade(&state), listens));
        }
        Ok(state)
    }

    /// Whether Redis answered its last call.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// This process's tag among the replicas.
    pub(crate) fn tag(&self) -> u64 {
        self.tag
    }

    /// The channel on which the replica with `tag` hears answers to the requests it asked.
    pub(crate) fn answers_channel(&self, tag: u64) -> String {
        self.key(format_args!("answers:{tag:x}"))
    }

    /// Records whether Redis answers.
    fn set_up(&self, up: bool) -> bool {
        self.up_changes.send_replace(up);
        self.up.swap(up, Ordering::Relaxed)
    }

    /// Waits until Redis answers (or `within` has passed); whether it does.
    #[cfg(test)]
    pub(crate) async fn reachable(&self, within: Duration) -> bool {
        let mut rx = self.up_changes.subscribe();
        tokio::time::timeout(within, rx.wait_for(|up| *up)).await.is_ok_and(|r| r.is_ok())
    }

    /// A key or channel name under the configured prefix.
    pub(crate) fn key(&self, parts: std::fmt::Arguments<'_>) -> String {
        format!("{}{parts}", self.at.prefix)
    }

    /// The connection, while up.
    fn connection(&self) -> Result<MultiplexedConnection, StateError> {
        match &*self.conn.load() {
            Some(c) if self.is_up() => Ok(MultiplexedConnection::clone(c)),
            _ => Err(StateError::Unavailable("not connected".into())),
        }
    }

    /// Marks the connection lost (the keeper reconnects); logged once per outage.
    fn lose(&self, why: &str) {
        self.conn.store(None);
        if self.set_up(false) {
            tracing::warn!(state = %self.at, error = why, "shared state (Redis) lost: rate limits and the failure throttle count per replica until it is back");
        }
        self.lost.notify_one();
    }

    /// Runs one script call with the deadline; a failure marks the connection lost.
    async fn invoke<T: redis::FromRedisValue>(&self, inv: redis::ScriptInvocation<'_>) -> Result<T, StateError> {
        let mut conn = self.connection()?;
        self.bounded(inv.invoke_async::<T>(&mut conn)).await
    }

    /// Waits for one call's answer within [`DEADLINE`]; a failure marks the connection lost.
    async fn bounded<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StateError> {
        let why = match tokio::time::timeout(DEADLINE, call).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in time".to_owned(),
        };
        self.lose(&why);
        Err(StateError::Unavailable(why))
    }

    /// Takes up to `want` tokens from the shared bucket `key` of `rate`.
    pub(crate) async fn take(&self, key: &str, rate: Rate, want: u32) -> Result<Grant, StateError> {
        let mut inv = self.take.prepare_invoke();
        inv.key(self.key(format_args!("rate:{}/{}:{key}", rate.count, rate.per.as_millis())))
            .arg(rate.count)
            .arg(period_ms(rate))
            .arg(i64::from(want));
        let (granted, wait): (i64, i64) = self.invoke(inv).await?;
        Ok(Grant {
            granted: u32::try_from(granted.max(0)).unwrap_or(u32::MAX),
            wait: Duration::from_millis(wait.max(1).cast_unsigned()),
        })
    }

    /// Returns unused tokens to the shared bucket `key` of `rate` (capped at its size).
    pub(crate) async fn refund(&self, key: &str, rate: Rate, n: u32) -> Result<(), StateError> {
        let mut inv = self.take.prepare_invoke();
        inv.key(self.key(format_args!("rate:{}/{}:{key}", rate.count, rate.per.as_millis())))
            .arg(rate.count)
            .arg(period_ms(rate))
            .arg(-i64::from(n));
        let _: (i64, i64) = self.invoke(inv).await?;
        Ok(())
    }

    /// Counts a failed authentication from `client` on every replica; how long it is blocked,
    /// if it is.
    pub(crate) async fn failed(&self, client: IpAddr, limit: FailureLimit) -> Result<Option<Duration>, StateError> {
        let mut inv = self.fail.prepare_invoke();
        inv.key(self.key(format_args!("fail:{client}")))
            .key(self.key(format_args!("block:{client}")))
            .arg(limit.max)
            .arg(limit.window.as_millis().max(1).to_string())
            .arg(limit.block.as_millis().max(1).to_string());
        let blocked: i64 = self.invoke(inv).await?;
        Ok((blocked > 0).then(|| Duration::from_millis(blocked.cast_unsigned())))
    }
}

impl SharedState {
    /// Publishes `msg` on `channel` (in the background, in order); false when Redis is away or
    /// the queue is full (the message is dropped, as on a full stream).
    pub(crate) fn publish(&self, channel: String, msg: bytes::Bytes) -> bool {
        self.is_up() && self.publish.try_send((channel, msg)).is_ok()
    }

    /// How many connections hear `channel` now (`PUBSUB NUMSUB`): whether a stream is held.
    pub(crate) async fn listeners(&self, channel: &str) -> Result<u64, StateError> {
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg("NUMSUB").arg(channel);
        self.query::<(String, u64)>(&cmd).await.map(|(_, n)| n)
    }

    /// Keeps `value` under `key` for `ttl`.
    pub(crate) async fn remember(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StateError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("PX").arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self.query::<()>(&cmd).await
    }

    /// What is kept under `key`, if anything.
    pub(crate) async fn recall(&self, key: &str) -> Result<Option<String>, StateError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.query::<Option<String>>(&cmd).await
    }

    /// Runs one command with the deadline; a failure marks the connection lost.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StateError> {
        let mut conn = self.connection()?;
        self.bounded(cmd.query_async::<T>(&mut conn)).await
    }

    /// Hears `channel` here until the subscription is dropped (a later subscription to the
    /// same channel replaces it). Up to 256 messages wait; more are dropped.
    pub(crate) fn subscribe(self: &Arc<Self>, channel: String) -> Subscription {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let (confirmed, ready) = tokio::sync::oneshot::channel();
        let fresh = crate::sharded::lock(&self.heard).insert(channel.clone(), (id, tx)).is_none();
        if fresh {
            let _ = self.listen.send((channel.clone(), true, Some(confirmed)));
        } else {
            // Heard already: the replaced subscription's confirmation holds.
            let _ = confirmed.send(());
        }
        Subscription { rx, ready: Some(ready), channel, id, state: Arc::downgrade(self) }
    }
}

/// Sends queued messages, one `PUBLISH` at a time (so a session's messages keep their order);
/// while Redis is away they are dropped.
async fn publish_all(state: Weak<SharedState>, mut queue: tokio::sync::mpsc::Receiver<(String, bytes::Bytes)>) {
    while let Some((channel, msg)) = queue.recv().await {
        let Some(s) = state.upgrade() else { return };
        let Ok(mut conn) = s.connection() else { continue };
        let sent = tokio::time::timeout(
            DEADLINE,
            redis::cmd("PUBLISH").arg(&channel).arg(msg.as_ref()).query_async::<i64>(&mut conn),
        )
        .await;
        match sent {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => s.lose(&e.to_string()),
            Err(_) => s.lose("no answer in time"),
        }
    }
}

/// Keeps a listening connection subscribed to every channel heard here, reconnecting while
/// Redis is away (messages published meanwhile are lost: Redis keeps none).
async fn keep_listening(state: Weak<SharedState>, mut changes: tokio::sync::mpsc::UnboundedReceiver<ListenChange>) {
    use futures_util::StreamExt;
    loop {
        let Some(s) = state.upgrade() else { return };
        let client = s.client.clone();
        drop(s);
        let pubsub = tokio::time::timeout(Duration::from_secs(1), client.get_async_pubsub()).await;
        let Ok(Ok(pubsub)) = pubsub else {
            // Changes meanwhile are in `heard`, which the next connection subscribes to.
            while changes.try_recv().is_ok() {}
            tokio::time::sleep(RECONNECT_EVERY).await;
            continue;
        };
        let (mut sink, mut stream) = pubsub.split();
        // Changes queued so far are in `heard` already; later ones come through `changes`.
        while changes.try_recv().is_ok() {}
        let Some(s) = state.upgrade() else { return };
        let channels: Vec<String> = crate::sharded::lock(&s.heard).keys().cloned().collect();
        drop(s);
        let mut ok = true;
        for c in channels {
            ok &= tokio::time::timeout(DEADLINE, sink.subscribe(&c)).await.is_ok_and(|r| r.is_ok());
        }
        while ok {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    let Some(s) = state.upgrade() else { return };
                    let to = crate::sharded::lock(&s.heard).get(msg.get_channel_name()).map(|(_, tx)| tx.clone());
                    if let Some(tx) = to {
                        let _ = tx.try_send(bytes::Bytes::copy_from_slice(msg.get_payload_bytes()));
                    }
                }
                change = changes.recv() => {
                    let Some((channel, on, confirm)) = change else { return };
                    let done = if on { sink.subscribe(&channel).await } else { sink.unsubscribe(&channel).await };
                    ok = done.is_ok();
                    if let (true, Some(confirm)) = (ok, confirm) {
                        let _ = confirm.send(());
                    }
                }
            }
        }
        tokio::time::sleep(RECONNECT_EVERY).await;
    }
}

fn period_ms(rate: Rate) -> String {
    rate.per.as_millis().max(1).to_string()
}

/// Keeps one multiplexed connection up: connects, checks a quiet one every [`PING_EVERY`],
/// reconnects every [`RECONNECT_EVERY`] while Redis is away. Ends with its state.
async fn keep_connected(state: Weak<SharedState>) {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(DEADLINE));
    let mut first = true;
    loop {
        let Some(s) = state.upgrade() else { return };
        if s.conn.load().is_none() {
            match s.client.get_multiplexed_async_connection_with_config(&config).await {
                Ok(mut c) => {
                    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut c).await;
                    if pong.is_ok() {
                        s.conn.store(Some(Arc::new(c)));
                        s.set_up(true);
                        tracing::info!(state = %s.at, "shared state (Redis) reachable: limits hold across replicas");
                        first = false;
                    }
                }
                Err(e) => {
                    if first {
                        tracing::warn!(state = %s.at, error = %e, "shared state (Redis) unreachable: rate limits and the failure throttle count per replica until it is");
                        first = false;
                    }
                }
            }
            if s.conn.load().is_none() {
                drop(s);
                tokio::time::sleep(RECONNECT_EVERY).await;
                continue;
            }
        }
        // Held while waiting (at most PING_EVERY): a dropped state ends the task after that.
        tokio::select! {
            () = s.lost.notified() => {}
            () = tokio::time::sleep(PING_EVERY) => {
                if let Ok(mut c) = s.connection() {
                    let pong = tokio::time::timeout(DEADLINE, redis::cmd("PING").query_async::<String>(&mut c)).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        s.lose("no answer to PING");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The Redis the tests use (`PORTCULLIS_TEST_REDIS`, `off` to skip), under a prefix of
    /// their own.
    pub(crate) async fn test_state() -> Option<Arc<SharedState>> {
        let url = std::env::var("PORTCULLIS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
        if url == "off" {
            return None;
        }
        let prefix = format!("pcs-test-{}:", crate::random::id().unwrap());
        let state = SharedState::start(&StateLocation { url: url.clone(), prefix }).unwrap();
        assert!(
            state.reachable(Duration::from_secs(5)).await,
            "Redis is not reachable at {url} (set PORTCULLIS_TEST_REDIS, or `off` to skip)"
        );
        Some(state)
    }

    #[tokio::test]
    async fn a_shared_bucket_grants_what_it_holds_then_says_how_long_to_wait() {
        let Some(state) = test_state().await else { return };
        let rate = Rate { count: 5, per: Duration::from_secs(60) };
        assert_eq!(state.take("k", rate, 3).await.unwrap().granted, 3);
        assert_eq!(state.take("k", rate, 3).await.unwrap().granted, 2);
        let empty = state.take("k", rate, 3).await.unwrap();
        assert_eq!(empty.granted, 0);
        // One token per 12 s.
        assert!(empty.wait > Duration::from_secs(10) && empty.wait <= Duration::from_secs(12), "{empty:?}");
        // Returned tokens are there again, never past the burst.
        state.refund("k", rate, 9).await.unwrap();
        assert_eq!(state.take("k", rate, 10).await.unwrap().granted, 5);
        // Another key, or the same key under another rate, is another bucket.
        assert_eq!(state.take("other", rate, 10).await.unwrap().granted, 5);
        let faster = Rate { count: 5, per: Duration::from_secs(1) };
        assert_eq!(state.take("k", faster, 10).await.unwrap().granted, 5);
    }

    #[tokio::test]
    async fn failures_block_an_address_once_over_the_limit() {
        let Some(state) = test_state().await else { return };
        let limit = FailureLimit { max: 3, window: Duration::from_secs(60), block: Duration::from_secs(30) };
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(state.failed(ip, limit).await.unwrap(), None);
        }
        let blocked = state.failed(ip, limit).await.unwrap().unwrap();
        assert!(blocked > Duration::from_secs(29) && blocked <= Duration::from_secs(30), "{blocked:?}");
        assert!(state.failed(ip, limit).await.unwrap().is_some());
        assert_eq!(state.failed("192.0.2.10".parse().unwrap(), limit).await.unwrap(), None);
    }

    #[test]
    fn the_password_is_never_shown() {
        let at = |url: &str| StateLocation { url: url.into(), prefix: "p:".into() }.to_string();
        assert_eq!(at("redis://127.0.0.1:6379/2"), "redis://127.0.0.1:6379/2");
        assert_eq!(at("redis://:s3cret@host:6379/2"), "redis://:***@host:6379/2");
        assert_eq!(at("redis://user:s3cret@host/0"), "redis://user:***@host/0");
        assert_eq!(at("redis://user:p@ss@host"), "redis://user:***@host");
        assert!(!at("redis://u:s3cret@h").contains("s3cret"));
    }
}
