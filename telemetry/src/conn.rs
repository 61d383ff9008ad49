//! Bounds on the connections a listener holds, shared by the agent's
//! Workload API socket and the server's agent-API port: a connection must
//! send the HTTP/2 preface within a deadline, is closed once it has been
//! idle (no request in flight) for a while, and counts against a global cap
//! and a per-source cap (uid on the agent, address on the server). Without
//! these a peer that connects and stays silent holds a file descriptor and
//! buffers forever, and enough of them exhaust the process.
//!
//! How the pieces fit: the accept loop takes a [`ConnPermit`] from
//! [`ConnLimits`] (or refuses the connection); the connection's I/O wrapper
//! polls a [`ConnTimer`] on every read and reports end-of-stream when it
//! expires; an [`ActivityLayer`] in the gRPC server counts the requests in
//! flight on each connection (a request lasts until its response body is
//! dropped, so an open server stream keeps its connection busy), which is
//! what "idle" means to the timer.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Requests in flight on one connection, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Debug)]
struct ActivityState {
    in_flight: usize,
    idle_since: Instant,
}

impl Activity {
    /// A connection that has just opened: idle, with nothing in flight.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                idle_since: Instant::now(),
            }),
        })
    }

    /// Counts one request until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.lock().in_flight += 1;
        ActivityGuard(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// When the connection last became idle, or `None` while it is busy.
    fn idle_since(&self) -> Option<Instant> {
        let state = self.lock();
        (state.in_flight == 0).then_some(state.idle_since)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One request in flight; see [`Activity::begin`].
#[derive(Debug)]
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
        }
    }
}

/// A connection's `ConnectInfo` (what tonic puts in each request's
/// extensions) that carries its [`Activity`].
pub trait Tracked: Clone + Send + Sync + 'static {
    /// The connection's activity counter.
    fn activity(&self) -> &Arc<Activity>;
    /// Adds what handlers expect to find in the request's extensions.
    fn extend(&self, _extensions: &mut http::Extensions) {}
}

/// A tower layer that counts each request against its connection's
/// [`Activity`] (found as the `I` in the request's extensions) until the
/// response body is dropped.
pub struct ActivityLayer<I> {
    _info: PhantomData<fn() -> I>,
}

impl<I> ActivityLayer<I> {
    /// Counts requests whose connection info is an `I`.
    pub fn new() -> Self {
        Self { _info: PhantomData }
    }
}

impl<I> Default for ActivityLayer<I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I> Clone for ActivityLayer<I> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<S, I> tower::Layer<S> for ActivityLayer<I> {
    type Service = ActivityService<S, I>;

    fn layer(&self, inner: S) -> Self::Service {
        ActivityService {
            inner,
            _info: PhantomData,
        }
    }
}

/// The service [`ActivityLayer`] wraps.
pub struct ActivityService<S, I> {
    inner: S,
    _info: PhantomData<fn() -> I>,
}

impl<S: Clone, I> Clone for ActivityService<S, I> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _info: PhantomData,
        }
    }
}

impl<S, I, B, RB> tower::Service<http::Request<B>> for ActivityService<S, I>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    I: Tracked,
{
    type Response = http::Response<Counted<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let info = req.extensions().get::<I>().cloned();
        let guard = info.as_ref().map(|i| i.activity().begin());
        if let Some(info) = &info {
            info.extend(req.extensions_mut());
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            Ok(response.map(|inner| Counted {
                inner,
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its request counted until it is dropped.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    _guard: Option<ActivityGuard>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why a [`ConnTimer`] ended its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// The HTTP/2 client preface did not arrive in time.
    Preface,
    /// No request was in flight for the idle timeout.
    Idle,
}

/// The HTTP/2 client preface's length (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;

/// A connection's deadlines: the preface must be complete by the preface
/// deadline; after that the connection may be idle for `idle` at most.
/// Polled from the connection's `poll_read`, which the HTTP/2 server keeps
/// pending for as long as the connection lives, so no extra task is needed.
#[derive(Debug)]
pub struct ConnTimer {
    activity: Arc<Activity>,
    /// Set until the preface's bytes have all been read.
    preface_by: Option<Instant>,
    preface_left: usize,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    armed: Instant,
}

/// The two timeouts of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept (or the end of the TLS handshake) to the last preface byte.
    pub preface: Duration,
    /// Longest time with no request in flight.
    pub idle: Duration,
}

impl ConnTimer {
    /// Starts the preface deadline now.
    pub fn new(timeouts: Timeouts, activity: Arc<Activity>) -> Self {
        let now = Instant::now();
        let preface_by = now + timeouts.preface;
        Self {
            activity,
            preface_by: Some(preface_by),
            preface_left: PREFACE_LEN,
            idle: timeouts.idle,
            sleep: Box::pin(tokio::time::sleep_until(preface_by)),
            armed: preface_by,
        }
    }

    /// Notes `n` bytes read from the client.
    pub fn read(&mut self, n: usize) {
        if self.preface_by.is_some() {
            self.preface_left = self.preface_left.saturating_sub(n);
            if self.preface_left == 0 {
                self.preface_by = None;
            }
        }
    }

    /// `Ready` once the connection must close; otherwise registers a wakeup
    /// for the next deadline.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Expired> {
        loop {
            let now = Instant::now();
            let (deadline, why) = match (self.preface_by, self.activity.idle_since()) {
                (Some(by), _) => (Some(by), Expired::Preface),
                (None, Some(since)) => (Some(since + self.idle), Expired::Idle),
                // Busy: look again one idle period on; the idle clock only
                // starts once the last request ends.
                (None, None) => (None, Expired::Idle),
            };
            match deadline {
                Some(at) if at <= now => return Poll::Ready(why),
                Some(at) if at != self.armed => self.arm(at),
                None if self.armed <= now => self.arm(now + self.idle),
                _ => {}
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The sleep fired: the next pass decides, and re-arms it.
            if deadline.is_none() {
                self.arm(now + self.idle);
            }
        }
    }

    fn arm(&mut self, at: Instant) {
        self.armed = at;
        self.sleep.as_mut().reset(at);
    }
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener holds its maximum number of connections.
    Global(usize),
    /// The connection's source holds its maximum number.
    PerSource(usize),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Global(n) => write!(f, "{n} connections open, the listener's limit"),
            Self::PerSource(n) => write!(f, "{n} connections open from this source, its limit"),
        }
    }
}

/// Open connections: all of them under a global cap, and each source's
/// under a per-source cap.
#[derive(Debug)]
pub struct ConnLimits<K: Hash + Eq> {
    max: usize,
    per_source: usize,
    open: Mutex<Counts<K>>,
}

#[derive(Debug)]
struct Counts<K> {
    total: usize,
    /// The most open at once since the last heap trim (see `crate::heap`).
    peak: usize,
    by_source: HashMap<K, usize>,
}

impl<K: Hash + Eq + Clone> ConnLimits<K> {
    /// At most `max` connections, `per_source` of them from one source.
    pub fn new(max: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_source,
            open: Mutex::new(Counts {
                total: 0,
                peak: 0,
                by_source: HashMap::new(),
            }),
        })
    }

    /// A permit for one more connection from `source`, released when
    /// dropped, or which cap refuses it.
    pub fn acquire(self: &Arc<Self>, source: K) -> Result<ConnPermit<K>, Refused> {
        let mut open = self.lock();
        if open.total >= self.max {
            return Err(Refused::Global(self.max));
        }
        let count = open.by_source.entry(source.clone()).or_default();
        if *count >= self.per_source {
            return Err(Refused::PerSource(self.per_source));
        }
        *count += 1;
        open.total += 1;
        open.peak = open.peak.max(open.total);
        Ok(ConnPermit {
            limits: self.clone(),
            source: Some(source),
        })
    }

    /// Connections open now, in all and from `source`.
    pub fn open(&self, source: &K) -> (usize, usize) {
        let open = self.lock();
        (open.total, open.by_source.get(source).copied().unwrap_or(0))
    }

    /// Has glibc return freed heap memory once the open count has fallen
    /// well below its peak and stayed there, i.e. after a flood (see
    /// `crate::heap` for when, and why not periodically). Call it for the
    /// one limiter that counts all of a listener's connections; it needs a
    /// tokio runtime, and its task ends when the limits are dropped. Does
    /// nothing where the allocator is not glibc's.
    pub fn trim_heap_after_floods(self: &Arc<Self>)
    where
        K: Send + 'static,
    {
        if crate::sys::CAN_TRIM {
            tokio::spawn(crate::heap::watch(Arc::downgrade(self)));
        }
    }

    /// The most connections open at once since the last reset, and now.
    pub(crate) fn peak_and_open(&self) -> (usize, usize) {
        let open = self.lock();
        (open.peak, open.total)
    }

    /// Starts the peak again from the connections open now.
    pub(crate) fn reset_peak(&self) {
        let mut open = self.lock();
        open.peak = open.total;
    }

    fn release_source(&self, open: &mut Counts<K>, source: &K) {
        if let Some(count) = open.by_source.get_mut(source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.by_source.remove(source);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts<K>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One open connection; dropping it frees its slots.
#[derive(Debug)]
pub struct ConnPermit<K: Hash + Eq + Clone> {
    limits: Arc<ConnLimits<K>>,
    /// Taken when the permit is dropped.
    source: Option<K>,
}

impl<K: Hash + Eq + Clone> Drop for ConnPermit<K> {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(source) = self.source.take() {
            self.limits.release_source(&mut open, &source);
        }
    }
}

/// What an HTTP/2 server sends a client it refuses: its SETTINGS, then a
/// GOAWAY (ENHANCE_YOUR_CALM, no stream processed) with `message` as the
/// debug data, which gRPC clients show in their error.
pub fn goaway_frames(message: &str) -> Vec<u8> {
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    // Far below the 16 KiB frame size every peer accepts.
    let message = &message.as_bytes()[..message.len().min(1024)];
    let mut out = Vec::with_capacity(9 + 9 + 8 + message.len());
    out.extend_from_slice(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
    let len = u32::try_from(8 + message.len()).unwrap_or(8).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], GOAWAY, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Raises the soft open-file limit to the hard one (a service's soft
/// limit is often 1024 while its hard limit is far higher) and returns the
/// soft limit now in force; `None` if it is unlimited or unknown.
pub fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return limit.maximum,
            // Only the lower limit stays, which fit_to_fd_limit accounts for.
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
    limit.current
}

/// The most connections that fit under `fd_limit` when each costs
/// `fds_per_connection` descriptors and `reserve` are kept for the
/// process's own files: `configured`, or less if it does not fit (with the
/// reason, for a warning). An error if not even `minimum` fit.
pub fn fit_to_fd_limit(
    configured: usize,
    fd_limit: Option<u64>,
    fds_per_connection: usize,
    reserve: usize,
    minimum: usize,
) -> Result<(usize, Option<String>), String> {
    let Some(limit) = fd_limit else {
        return Ok((configured, None));
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let room = limit.saturating_sub(reserve) / fds_per_connection.max(1);
    if room < minimum {
        return Err(format!(
            "the open-file limit ({limit}) leaves room for {room} connections after the \
             {reserve} descriptors kept for the process's own files; raise it (LimitNOFILE= \
             in systemd, ulimit -n) to at least {}",
            reserve + minimum * fds_per_connection
        ));
    }
    if configured > room {
        return Ok((
            room,
            Some(format!(
                "max_connections {configured} does not fit the open-file limit ({limit}, \
                 {fds_per_connection} per connection, {reserve} kept for the process's own \
                 files); using {room}"
            )),
        ));
    }
    Ok((configured, None))
}

/// What a listener's connections cost in descriptors, and what the process
/// keeps for its own files: the budget its caps are fitted into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// Descriptors one connection may cost.
    pub per_connection: usize,
    /// Descriptors always kept for the process's own files.
    pub reserve: usize,
    /// Fewer connections than this under the limit is a setup error.
    pub minimum: usize,
}

/// A listener's caps fitted under the open-file limit `fd_limit`: `max`
/// lowered (with a warning logged) if it would leave less than
/// `budget.reserve` descriptors, and `per_source` (per uid, per address)
/// never above the fitted `max`. Returns `(max, per_source)`; an error if
/// not even `budget.minimum` connections fit. The one fitting both the
/// agent's and the server's `ConnSettings::fitted` use.
pub fn fit_caps(
    max: usize,
    per_source: usize,
    fd_limit: Option<u64>,
    budget: FdBudget,
) -> Result<(usize, usize), String> {
    let (max, warning) = fit_to_fd_limit(
        max,
        fd_limit,
        budget.per_connection,
        budget.reserve,
        budget.minimum,
    )?;
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    Ok((max, per_source.min(max)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_fitted_and_per_source_follows_max() {
        let budget = FdBudget {
            per_connection: 2,
            reserve: 64,
            minimum: 1,
        };
        assert_eq!(fit_caps(100, 10, None, budget), Ok((100, 10)));
        assert_eq!(fit_caps(4096, 4096, Some(1024), budget), Ok((480, 480)));
        assert_eq!(fit_caps(4096, 64, Some(1024), budget), Ok((480, 64)));
        assert!(fit_caps(4096, 64, Some(64), budget).is_err());
    }

    #[test]
    fn permits_count_globally_and_per_source() {
        let limits = ConnLimits::new(3, 2);
        let a = limits.acquire(1).ok();
        let b = limits.acquire(1).ok();
        assert!(a.is_some() && b.is_some());
        assert_eq!(limits.acquire(1).err(), Some(Refused::PerSource(2)));
        let c = limits.acquire(2).ok();
        assert!(c.is_some());
        assert_eq!(limits.acquire(3).err(), Some(Refused::Global(3)));
        assert_eq!(limits.open(&1), (3, 2));
        drop(b);
        assert!(limits.acquire(1).is_ok());
        drop((a, c));
        assert_eq!(limits.open(&1), (0, 0));
    }

    #[test]
    fn the_fd_budget_clamps_or_refuses() {
        assert_eq!(fit_to_fd_limit(100, None, 2, 64, 1), Ok((100, None)));
        assert_eq!(fit_to_fd_limit(100, Some(1024), 2, 64, 1), Ok((100, None)));
        let (n, why) = fit_to_fd_limit(4096, Some(1024), 2, 64, 1).unwrap_or_default();
        assert_eq!(n, 480);
        assert!(why.is_some_and(|w| w.contains("using 480")));
        assert!(fit_to_fd_limit(4096, Some(100), 2, 64, 32).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_waits_for_the_preface_then_for_idleness() {
        let timeouts = Timeouts {
            preface: Duration::from_secs(2),
            idle: Duration::from_secs(5),
        };
        let expired = |timer: &mut ConnTimer| {
            let waker = std::task::Waker::noop();
            timer.poll_expired(&mut Context::from_waker(waker))
        };
        let activity = Activity::new();
        let mut timer = ConnTimer::new(timeouts, activity.clone());
        timer.read(23);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(expired(&mut timer), Poll::Ready(Expired::Preface));

        let mut timer = ConnTimer::new(timeouts, activity.clone());
        timer.read(24);
        let busy = activity.begin();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(expired(&mut timer), Poll::Pending, "busy is never idle");
        drop(busy);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(expired(&mut timer), Poll::Pending);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(expired(&mut timer), Poll::Ready(Expired::Idle));
    }
}
