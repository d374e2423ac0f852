//! Progress reporting: a small trait the library calls while it works, and a terminal
//! implementation with `indicatif` bars that the CLI installs.
//!
//! The library never prints: long phases (scoring per schedule step, NTK projections,
//! Hessian probes, gate epochs) announce themselves with [`begin`] and advance with
//! [`tick`]. Both go to the sink installed on the current thread with [`install`]; with
//! none installed they do nothing. A thread-local sink (rather than a parameter) keeps the
//! hooks inside the criteria to one line each, and keeps concurrent sessions in one process
//! (the test harness) from drawing into each other's bars.

use std::cell::RefCell;
use std::sync::Arc;

/// Receives progress events. Implementations must be cheap: `inc` may be called per epoch
/// or per projection.
pub trait Progress: Send + Sync {
    /// A new phase `label` with `total` steps (0 when the count is not known).
    fn begin(&self, label: &str, total: u64);
    /// `n` more steps of the current phase are done.
    fn inc(&self, n: u64);
    /// The current phase is over.
    fn finish(&self);
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<dyn Progress>>> = const { RefCell::new(None) };
}

/// Restores the previously installed sink when dropped.
pub struct Installed {
    previous: Option<Arc<dyn Progress>>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let prev = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

/// Sends the progress events of this thread to `sink` until the guard is dropped.
#[must_use = "progress goes to the sink only while the guard lives"]
pub fn install(sink: Arc<dyn Progress>) -> Installed {
    let previous = CURRENT.with(|c| c.borrow_mut().replace(sink));
    Installed { previous }
}

fn with(f: impl FnOnce(&dyn Progress)) {
    // Cloned out of the cell so that a sink may itself emit events without a re-borrow.
    let sink = CURRENT.with(|c| c.borrow().clone());
    if let Some(s) = sink {
        f(&*s);
    }
}

/// Starts a phase of `total` steps.
pub fn begin(label: &str, total: usize) {
    with(|p| p.begin(label, total as u64));
}

/// One step of the current phase is done.
pub fn tick() {
    with(|p| p.inc(1));
}

/// The current phase is over.
pub fn finish() {
    with(|p| p.finish());
}

/// Progress bars on stderr. Drawn only when stderr is a terminal (indicatif's stderr
/// target hides itself otherwise), never with `hidden`; results stay on stdout.
pub struct Bars {
    bar: indicatif::ProgressBar,
}

impl Bars {
    pub fn stderr(hidden: bool) -> Bars {
        let target =
            if hidden { indicatif::ProgressDrawTarget::hidden() } else { indicatif::ProgressDrawTarget::stderr() };
        let bar = indicatif::ProgressBar::with_draw_target(None, target);
        Bars { bar }
    }

    /// Whether anything will be drawn.
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }
}

impl Progress for Bars {
    fn begin(&self, label: &str, total: u64) {
        // `wide_bar` fills what the terminal has left, so the line never wraps.
        let style = if total > 0 {
            indicatif::ProgressStyle::with_template("{prefix} {msg} [{wide_bar}] {pos}/{len} {elapsed}")
        } else {
            indicatif::ProgressStyle::with_template("{prefix} {msg} {spinner} {elapsed}")
        };
        // Everything is set before the message, whose change draws the new phase at once.
        self.bar.reset();
        self.bar.set_length(total);
        if let Ok(s) = style {
            self.bar.set_style(s.progress_chars("=> "));
        }
        self.bar.set_prefix("scoring");
        self.bar.set_message(label.to_string());
    }

    fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Record(Mutex<Vec<String>>);

    impl Progress for Record {
        fn begin(&self, label: &str, total: u64) {
            self.0.lock().unwrap().push(format!("begin {label} {total}"));
        }
        fn inc(&self, n: u64) {
            self.0.lock().unwrap().push(format!("inc {n}"));
        }
        fn finish(&self) {
            self.0.lock().unwrap().push("finish".into());
        }
    }

    #[test]
    fn events_reach_the_installed_sink_only_while_installed() {
        tick(); // nothing installed: a no-op
        let r = Arc::new(Record::default());
        {
            let _g = install(r.clone());
            begin("phase", 2);
            tick();
            tick();
            finish();
        }
        tick();
        assert_eq!(*r.0.lock().unwrap(), ["begin phase 2", "inc 1", "inc 1", "finish"]);
    }

    #[test]
    fn hidden_bars_draw_nothing() {
        assert!(Bars::stderr(true).is_hidden());
    }
}
