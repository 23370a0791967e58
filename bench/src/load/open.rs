//! Open-loop HTTP/1.1, HTTP/2 and gRPC at a fixed rate.
//!
//! tokio's timer ticks in milliseconds, which would bunch requests and add up
//! to 1 ms of fake latency, so the schedule is kept by a dedicated pacer
//! thread that `std::thread::sleep`s until each due time (typically under
//! 100 µs late; when behind, it hands out everything already due at once). Request
//! `k` goes to connection `k mod connections` through that connection's
//! channel; connections are tasks on the current-thread runtime.
//!
//! Charging, per request: if its connection had a free slot at its due time,
//! latency runs from when the connection picked it up (the pacer's and the
//! runtime's lateness is the generator's, not the system under test's);
//! otherwise (every slot busy: HTTP/1.1 one, HTTP/2 `streams`) it runs from
//! its due time, so a slow answer is charged to every request it delayed
//! (no coordinated omission).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::{JoinError, JoinSet};
use tokio::time::timeout_at;

use super::client::{Endpoint, ReqBody, ResponseFuture, Sender};
use super::{GRACE, SharedStats, Stats, TIMEOUT_AT_END, describe, lock, runtime};
use crate::model::LoadResult;

/// The pacer starts this long after the connections are up, so its first
/// sleep is a real one rather than an immediate catch-up.
const LEAD: Duration = Duration::from_millis(2);

/// What to run.
pub(super) struct OpenSpec {
    pub(super) endpoint: Endpoint,
    pub(super) connections: usize,
    /// Concurrent requests per connection (1 for HTTP/1.1).
    pub(super) streams: usize,
    /// Requests per second, all connections together.
    pub(super) rate: u64,
    pub(super) duration: Duration,
    pub(super) warmup: Duration,
}

/// Runs `spec`: connects everything, then paces requests for warm-up +
/// duration; what is unfinished [`GRACE`] after that counts as errors.
pub(super) fn run(spec: OpenSpec) -> Result<LoadResult, String> {
    if spec.connections == 0 || spec.streams == 0 || spec.rate == 0 {
        return Err("connections, streams and rate must be positive".to_owned());
    }
    let rt = runtime()?;
    let stats = Stats::shared();
    let endpoint = Arc::new(spec.endpoint);
    let pacer = rt.block_on(async {
        // Connect up front so connection setup is not part of the run (a
        // connection that fails here is retried by its first request).
        let mut connects = JoinSet::new();
        for _ in 0..spec.connections {
            let endpoint = endpoint.clone();
            connects.spawn(async move { endpoint.connect().await.ok() });
        }
        let mut senders = Vec::with_capacity(spec.connections);
        while let Some(joined) = connects.join_next().await {
            senders.push(joined.ok().flatten());
        }

        let schedule = Schedule::new(Instant::now() + LEAD, spec.rate, spec.warmup, spec.duration);
        let deadline = schedule.end() + GRACE;
        let mut lanes = Vec::with_capacity(spec.connections);
        let mut conns = JoinSet::new();
        for sender in senders {
            let (tx, rx) = unbounded_channel();
            lanes.push(tx);
            let conn = Connection {
                endpoint: endpoint.clone(),
                sender,
                slots: spec.streams,
                stats: stats.clone(),
                deadline,
                free_at: Instant::now(),
                inflight: JoinSet::new(),
                inflight_recorded: 0,
            };
            conns.spawn(conn.drive(rx));
        }
        let pacer = std::thread::Builder::new()
            .name("nodeway-bench-pacer".to_owned())
            .spawn(move || schedule.pace(&lanes))
            .map_err(|e| format!("pacer thread: {e}"))?;
        while conns.join_next().await.is_some() {}
        Ok::<_, String>(pacer)
    })?;
    // The connections only finish once the pacer is done (or, 2 s after its
    // end, gave up on it), so this does not wait long.
    let undelivered = pacer
        .join()
        .map_err(|_| "pacer thread panicked".to_owned())?;
    let mut stats = Stats::take(&stats);
    stats.record_errors(undelivered, TIMEOUT_AT_END);
    Ok(stats.into_result(spec.duration))
}

/// One request handed from the pacer to a connection.
#[derive(Clone, Copy, Debug)]
struct Due {
    /// When it should be sent.
    at: Instant,
    /// Past the warm-up: counts in the result.
    recorded: bool,
}

/// The request timetable: request `k` is due at `start + k / rate`; those
/// due in the warm-up are sent but not recorded.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    start: Instant,
    rate: u64,
    /// Requests due before the end of warm-up + duration.
    total: u64,
    /// Index of the first request due after the warm-up.
    first_recorded: u64,
    span: Duration,
}

impl Schedule {
    fn new(start: Instant, rate: u64, warmup: Duration, duration: Duration) -> Schedule {
        let span = warmup + duration;
        // Number of k ≥ 0 with k / rate < t: ceil(t × rate).
        let count = |t: Duration| {
            let n = (t.as_nanos() * u128::from(rate)).div_ceil(1_000_000_000);
            u64::try_from(n).unwrap_or(u64::MAX)
        };
        Schedule {
            start,
            rate,
            total: count(span),
            first_recorded: count(warmup),
            span,
        }
    }

    fn due(&self, k: u64) -> Instant {
        let ns = u128::from(k) * 1_000_000_000 / u128::from(self.rate);
        self.start + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// End of the run: no request is due at or after it.
    fn end(&self) -> Instant {
        self.start + self.span
    }

    /// The pacer thread's body: sleeps until each due time and sends the
    /// request to its lane (round robin). Returns how many recorded requests
    /// could not be delivered because their connection had already given up.
    fn pace(&self, lanes: &[UnboundedSender<Due>]) -> u64 {
        let mut undelivered = 0;
        for (k, lane) in (0..self.total).zip(lanes.iter().cycle()) {
            let at = self.due(k);
            let now = Instant::now();
            if at > now {
                // A plain sleep (typically 50-100 µs late: the kernel's
                // timer slack) leaves the shared core to the runtime and the
                // backend; lateness is not charged (see `charge_from`).
                std::thread::sleep(at - now);
            }
            let due = Due {
                at,
                recorded: k >= self.first_recorded,
            };
            if lane.send(due).is_err() && due.recorded {
                undelivered += 1;
            }
        }
        undelivered
    }
}

/// When to start a request's clock (see the module docs): from when its
/// connection `picked` it if the connection had a free slot at its due time
/// (it got one back at `free_at`), else from the due time.
fn charge_from(due: Instant, free_at: Instant, picked: Instant) -> Instant {
    if free_at <= due { picked } else { due }
}

/// A finished request.
struct Done {
    due: Due,
    charge_from: Instant,
    completed: Instant,
    outcome: Result<(), String>,
}

/// Why a request could not be sent.
struct SendFailure {
    msg: String,
    /// The connection could not be (re)established: the requests queued
    /// behind this one fail the same way, now.
    drain: bool,
}

/// One client connection and the requests it owns.
struct Connection {
    endpoint: Arc<Endpoint>,
    /// `None`: to be (re)established by the next request.
    sender: Option<Sender>,
    /// Requests in flight at most.
    slots: usize,
    stats: SharedStats,
    /// End of the run + grace: everything unfinished then is an error.
    deadline: Instant,
    /// When a slot last became free after all were busy.
    free_at: Instant,
    inflight: JoinSet<Done>,
    /// Recorded requests among `inflight`.
    inflight_recorded: u64,
}

impl Connection {
    /// Takes requests from `rx` while a slot is free, until the pacer is
    /// done and every request has finished, or the deadline.
    async fn drive(mut self, mut rx: UnboundedReceiver<Due>) {
        let deadline = tokio::time::sleep_until(self.deadline.into());
        tokio::pin!(deadline);
        let mut pacing = true;
        while pacing || !self.inflight.is_empty() {
            tokio::select! {
                // Completions first: they free slots (and set `free_at`)
                // before the next request is looked at.
                biased;
                Some(joined) = self.inflight.join_next() => self.complete(joined),
                () = &mut deadline => {
                    self.give_up(&mut rx);
                    return;
                }
                due = rx.recv(), if pacing && self.inflight.len() < self.slots => match due {
                    Some(due) => self.dispatch(due, &mut rx).await,
                    None => pacing = false,
                },
            }
        }
    }

    /// Sends `due`'s request (reconnecting first if needed); its exchange
    /// runs in its own task.
    async fn dispatch(&mut self, due: Due, rx: &mut UnboundedReceiver<Due>) {
        let charge_from = charge_from(due.at, self.free_at, Instant::now());
        let response = match self.send(self.endpoint.request()).await {
            Ok(response) => response,
            Err(failure) => {
                self.fail(due, &failure.msg);
                if failure.drain {
                    while let Ok(queued) = rx.try_recv() {
                        self.fail(queued, &failure.msg);
                    }
                }
                return;
            }
        };
        let endpoint = self.endpoint.clone();
        if due.recorded {
            self.inflight_recorded += 1;
        }
        self.inflight.spawn(async move {
            let outcome = match response.await {
                Ok(resp) => endpoint.check(resp).await,
                Err(e) => Err(describe(&e)),
            };
            Done {
                due,
                charge_from,
                completed: Instant::now(),
                outcome,
            }
        });
    }

    /// Queues `req` on the connection, (re)connecting first if it is gone
    /// and waiting until it can take a request. Bounded by the deadline.
    async fn send(&mut self, req: Request<ReqBody>) -> Result<ResponseFuture, SendFailure> {
        let deadline = self.deadline.into();
        let timed_out = || SendFailure {
            msg: TIMEOUT_AT_END.to_owned(),
            drain: false,
        };
        let sender = match &mut self.sender {
            Some(sender) if !sender.is_closed() => sender,
            slot => {
                let connected = timeout_at(deadline, self.endpoint.connect())
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|msg| SendFailure { msg, drain: true })?;
                slot.insert(connected)
            }
        };
        match timeout_at(deadline, sender.ready()).await {
            Ok(Ok(())) => Ok(sender.send(req)),
            Ok(Err(msg)) => {
                // Closed under our feet: the next request reconnects.
                self.sender = None;
                Err(SendFailure { msg, drain: false })
            }
            Err(_) => Err(timed_out()),
        }
    }

    fn complete(&mut self, joined: Result<Done, JoinError>) {
        let was_full = self.inflight.len() + 1 >= self.slots;
        let done = match joined {
            Ok(done) => done,
            Err(e) => {
                // Cannot happen short of a bug in hyper; count it anyway.
                self.inflight_recorded = self.inflight_recorded.saturating_sub(1);
                self.free_at = Instant::now();
                lock(&self.stats).record_error(&format!("request task failed: {e}"));
                return;
            }
        };
        if was_full {
            self.free_at = self.free_at.max(done.completed);
        }
        if !done.due.recorded {
            return;
        }
        self.inflight_recorded -= 1;
        let mut stats = lock(&self.stats);
        match done.outcome {
            Ok(()) => stats.record_ok(done.completed - done.charge_from),
            Err(msg) => stats.record_error(&msg),
        }
    }

    fn fail(&self, due: Due, msg: &str) {
        if due.recorded {
            lock(&self.stats).record_error(msg);
        }
    }

    /// At the deadline: what is in flight or still queued is an error.
    fn give_up(&mut self, rx: &mut UnboundedReceiver<Due>) {
        rx.close();
        let mut lost = self.inflight_recorded;
        while let Ok(due) = rx.try_recv() {
            lost += u64::from(due.recorded);
        }
        self.inflight.abort_all();
        lock(&self.stats).record_errors(lost, TIMEOUT_AT_END);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_schedule_counts() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let s = Schedule::new(start, 1000, ms(100), ms(500));
        assert_eq!((s.first_recorded, s.total), (100, 600));
        assert_eq!(s.due(0), start);
        assert_eq!(s.due(100), start + ms(100));
        assert!(s.due(s.total - 1) < s.end());
        // Rates that do not divide a second.
        let s = Schedule::new(start, 3, ms(0), ms(1000));
        assert_eq!((s.first_recorded, s.total), (0, 3));
        assert_eq!(s.due(1), start + Duration::from_nanos(333_333_333));
        let s = Schedule::new(start, 7, ms(500), ms(500));
        assert_eq!((s.first_recorded, s.total), (4, 7));
        assert!(s.due(3) < start + ms(500) && s.due(4) >= start + ms(500));
    }

    #[test]
    fn load_pacer_delivers_round_robin() {
        let (tx0, mut rx0) = unbounded_channel();
        let (tx1, mut rx1) = unbounded_channel();
        rx1.close();
        let start = Instant::now();
        let s = Schedule::new(
            start,
            1000,
            Duration::from_millis(2),
            Duration::from_millis(8),
        );
        // Lane 1 is closed: its recorded requests are reported undelivered.
        assert_eq!(s.pace(&[tx0, tx1]), 4);
        assert!(start.elapsed() >= Duration::from_millis(9));
        let mut got = Vec::new();
        while let Ok(due) = rx0.try_recv() {
            got.push(due);
        }
        assert_eq!(got.len(), 5);
        assert_eq!(got.iter().filter(|d| d.recorded).count(), 4);
        assert!(got.windows(2).all(|w| w[0].at < w[1].at));
        assert!(rx1.try_recv().is_err());
    }

    #[test]
    fn load_charging() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Free before its due time: the pacer's lateness is not charged.
        assert_eq!(
            charge_from(t0 + ms(10), t0 + ms(5), t0 + ms(11)),
            t0 + ms(11)
        );
        assert_eq!(
            charge_from(t0 + ms(10), t0 + ms(10), t0 + ms(11)),
            t0 + ms(11)
        );
        // Busy at its due time: charged from then.
        assert_eq!(
            charge_from(t0 + ms(10), t0 + ms(30), t0 + ms(31)),
            t0 + ms(10)
        );
    }
}
