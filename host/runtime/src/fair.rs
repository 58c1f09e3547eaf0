//! Fair shares of the host's cores between models.
//!
//! Every sandbox may run its plugin's code at once, and the operating system shares the cores
//! between their threads, thread by thread, not model by model: a model whose plugin spins (or
//! whose callers simply send more) would take the cores from every other model. So each running
//! sandbox passes a *yield point* at every epoch tick (a few milliseconds of Wasm execution):
//! while more sandboxes run than the host has cores, a model that runs more than its fair share
//! (the cores divided by the models that want them) parks the sandbox there, off the CPU, until
//! the share allows it again. A model alone on the host may use every core; two models with
//! demand get half each, whatever either sends. A model *wants* cores while it has sandboxes and
//! for [`DEMAND_WINDOW`] after its last one ended, so an interactive model whose requests come
//! one after another finds its share free when the next one arrives, instead of queueing behind
//! a spinner that took the cores back in between. Time spent parked does not count against the
//! request's deadline (see [`Clock`]), only against a wall-clock bound several times longer.
//!
//! Work outside Wasm (a backend's inference, a host import) is not preempted; each of those is
//! bounded in size instead.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a model keeps its share after its last sandbox ended.
pub const DEMAND_WINDOW: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Counts {
    running: usize,
    parked: usize,
    /// Sandboxes in a host call that waits on work done elsewhere (no core used).
    waiting: usize,
    /// When its last sandbox ended (while it has none).
    idle_since: Option<Instant>,
}

impl Counts {
    fn wants(&self) -> bool {
        self.running + self.parked + self.waiting > 0
            || self.idle_since.is_some_and(|t| t.elapsed() < DEMAND_WINDOW)
    }
}

#[derive(Default)]
struct State {
    models: HashMap<Arc<str>, Counts>,
    running: usize,
}

impl State {
    /// A model's fair share of `slots` while the models with sandboxes compete.
    fn share(&self, slots: usize) -> usize {
        let wanting = self.models.values().filter(|c| c.wants()).count().max(1);
        (slots / wanting).max(1)
    }

    /// Whether a model other than `model` wants cores now.
    fn others_want(&self, model: &str) -> bool {
        self.models.iter().any(|(m, c)| &**m != model && c.wants())
    }

    fn must_park(&self, model: &str, slots: usize) -> bool {
        let mine = self.models.get(model).map_or(0, |c| c.running);
        // a model alone may use every core: parking helps only a model that waits for one
        self.running > slots && mine > self.share(slots) && self.others_want(model)
    }

    fn may_resume(&self, model: &str, slots: usize) -> bool {
        let mine = self.models.get(model).map_or(0, |c| c.running);
        self.running < slots || mine < self.share(slots) || !self.others_want(model)
    }
}

/// The host's cores, shared fairly between the models whose sandboxes run.
pub struct FairShare {
    slots: usize,
    state: Mutex<State>,
    changed: Condvar,
}

impl FairShare {
    /// Shares `slots` cores (at least one).
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self { slots: slots.max(1), state: Mutex::default(), changed: Condvar::new() })
    }

    /// The machine's cores.
    pub fn for_this_machine() -> Arc<Self> {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sandbox of `model` starts running.
    pub fn enter(self: &Arc<Self>, model: Arc<str>) -> Running {
        let mut s = self.lock();
        // forget models whose demand has passed
        s.models.retain(|_, c| c.wants());
        let c = s.models.entry(model.clone()).or_default();
        c.running += 1;
        c.idle_since = None;
        s.running += 1;
        Running { share: self.clone(), model }
    }

    /// Sandboxes running and parked for `model` (for tests and metrics).
    pub fn counts(&self, model: &str) -> (usize, usize) {
        self.lock().models.get(model).map_or((0, 0), |c| (c.running, c.parked))
    }
}

/// A sandbox of `model` steps out of the running count while it waits in a host call for work
/// done elsewhere (text generation: the batch worker's decode), and back in after; the model
/// keeps its demand meanwhile.
pub struct Waiter {
    share: Arc<FairShare>,
    model: Arc<str>,
}

impl Waiter {
    /// The waiter for sandboxes of `model`.
    pub fn new(share: Arc<FairShare>, model: Arc<str>) -> Self {
        Self { share, model }
    }
}

impl div_nn::Waiting for Waiter {
    fn begin(&self) {
        let fs = &self.share;
        let mut s = fs.lock();
        if let Some(c) = s.models.get_mut(&self.model) {
            c.running = c.running.saturating_sub(1);
            c.waiting += 1;
        }
        s.running = s.running.saturating_sub(1);
        fs.changed.notify_all();
    }

    fn end(&self) {
        let fs = &self.share;
        let mut s = fs.lock();
        if let Some(c) = s.models.get_mut(&self.model) {
            c.waiting = c.waiting.saturating_sub(1);
            c.running += 1;
        }
        // back to running; it parks at its next yield point if it is now above its share
        s.running += 1;
    }
}

/// A running sandbox's place in the share; leaves it when dropped.
pub struct Running {
    share: Arc<FairShare>,
    model: Arc<str>,
}

impl Running {
    /// Called at every epoch tick: parks the thread while this model runs more than its share
    /// and others wait; returns how long it was parked (never past `until`).
    pub fn yield_point(&self, until: Instant) -> Duration {
        let fs = &self.share;
        let mut s = fs.lock();
        if !s.must_park(&self.model, fs.slots) {
            return Duration::ZERO;
        }
        let started = Instant::now();
        if let Some(c) = s.models.get_mut(&self.model) {
            c.running -= 1;
            c.parked += 1;
        }
        s.running -= 1;
        fs.changed.notify_all();
        while !s.may_resume(&self.model, fs.slots) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = fs.changed.wait_timeout(s, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        if let Some(c) = s.models.get_mut(&self.model) {
            c.parked -= 1;
            c.running += 1;
        }
        s.running += 1;
        started.elapsed()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let fs = &self.share;
        let mut s = fs.lock();
        if let Some(c) = s.models.get_mut(&self.model) {
            c.running = c.running.saturating_sub(1);
            if c.running + c.parked == 0 {
                c.idle_since = Some(Instant::now());
            }
        }
        s.running = s.running.saturating_sub(1);
        fs.changed.notify_all();
    }
}

/// A request's time: its deadline counts time running, not time parked for fairness; a wall
/// bound (a multiple of the deadline) still ends a request that stays parked too long.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    started: Instant,
    parked: Duration,
    deadline: Duration,
    wall: Duration,
}

impl Clock {
    /// A clock started now.
    pub fn start(deadline: Duration) -> Self {
        Self { started: Instant::now(), parked: Duration::ZERO, deadline, wall: deadline.saturating_mul(4) }
    }

    /// Adds time spent parked.
    pub fn parked(&mut self, d: Duration) {
        self.parked += d;
    }

    /// Time spent parked so far.
    pub fn parked_total(&self) -> Duration {
        self.parked
    }

    /// Whether the request has used its time.
    pub fn expired(&self) -> bool {
        let elapsed = self.started.elapsed();
        elapsed.saturating_sub(self.parked) > self.deadline || elapsed > self.wall
    }

    /// The latest instant parking may last to.
    pub fn wall_end(&self) -> Instant {
        self.started + self.wall
    }

    /// The instant the deadline falls on if nothing more is parked.
    pub fn deadline_at(&self) -> Instant {
        (self.started + self.deadline + self.parked).min(self.started + self.wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_greedy_model_parks_down_to_its_share_and_a_lone_model_uses_every_slot() {
        let fs = FairShare::new(2);
        let greedy: Vec<Running> = (0..4).map(|_| fs.enter(Arc::from("greedy"))).collect();
        // alone: four sandboxes on two slots, but no one else wants them, so none parks
        let far = Instant::now() + Duration::from_millis(50);
        assert_eq!(greedy[0].yield_point(far), Duration::ZERO);
        // a second model arrives: the greedy one is above its share (1 of 2) and parks
        let victim = fs.enter(Arc::from("victim"));
        let fs2 = fs.clone();
        let parker = std::thread::spawn(move || {
            let g = fs2.enter(Arc::from("greedy"));
            g.yield_point(Instant::now() + Duration::from_secs(120))
        });
        // give the parker time to park, then let the victim finish: the parker resumes
        let mut parked_seen = false;
        for _ in 0..6000 {
            if fs.counts("greedy").1 == 1 {
                parked_seen = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(parked_seen, "a sandbox above its share parks while another model waits");
        assert_eq!(victim.yield_point(far), Duration::ZERO, "a model within its share never parks");
        drop(greedy);
        drop(victim);
        let parked_for = parker.join().unwrap_or_default();
        assert!(parked_for > Duration::ZERO && parked_for < Duration::from_secs(120));
        assert_eq!(fs.counts("greedy"), (0, 0));
    }

    #[test]
    fn a_sandbox_waiting_on_the_backend_leaves_its_core_to_others() {
        use div_nn::Waiting as _;
        let fs = FairShare::new(2);
        let _other = fs.enter(Arc::from("other"));
        // a chat model with three sandboxes, two of them waiting for the batch worker's decode
        let chat: Vec<Running> = (0..3).map(|_| fs.enter(Arc::from("chat"))).collect();
        let waiter = Waiter::new(fs.clone(), Arc::from("chat"));
        waiter.begin();
        waiter.begin();
        // running: other 1 + chat 1 = 2 on 2 slots: nobody parks
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(chat[0].yield_point(soon), Duration::ZERO, "waiting sandboxes use no core");
        assert_eq!(fs.counts("chat"), (1, 0));
        waiter.end();
        waiter.end();
        assert_eq!(fs.counts("chat"), (3, 0));
        // back to three running beside another model: above its share (1 of 2), it parks
        assert!(chat[0].yield_point(Instant::now() + Duration::from_millis(20)) > Duration::ZERO);
    }

    #[test]
    fn parked_time_is_not_deadline_time() {
        let long_ago = Instant::now().checked_sub(Duration::from_secs(10)).unwrap_or_else(Instant::now);
        let mut c = Clock {
            started: long_ago,
            parked: Duration::ZERO,
            deadline: Duration::from_secs(5),
            wall: Duration::from_secs(60),
        };
        assert!(c.expired(), "ten seconds running against a five-second deadline");
        c.parked(Duration::from_secs(10));
        assert!(!c.expired(), "parked the whole time");
        let c = Clock { parked: Duration::from_secs(100), wall: Duration::from_secs(8), ..c };
        assert!(c.expired(), "past the wall bound, however long it was parked");
    }
}
