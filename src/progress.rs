//! Progress of long work on stderr: a bar with ETA on a terminal; elsewhere (nohup, CI, Slurm logs) plain lines
//! at each tenth of the work and at least every 10 s, e.g. `adapt learned: step 30/100 loss 0.41 elapsed 3s
//! eta 7s`. Quiet progress prints nothing. Built without the `cli` feature (no `indicatif`), a terminal gets the
//! log lines too.

#[cfg(feature = "cli")]
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// The longest a log (non-terminal) goes without a line while work advances.
const LOG_EVERY: Duration = Duration::from_secs(10);

enum Sink {
    Hidden,
    #[cfg(feature = "cli")]
    Bar(indicatif::ProgressBar),
    Log {
        last_line: Instant,
        last_tenth: u64,
    },
}

/// Progress of `total` units of work named `what`.
pub struct Progress {
    what: String,
    unit: &'static str,
    total: u64,
    pos: u64,
    start: Instant,
    msg: String,
    sink: Sink,
}

impl Progress {
    /// `unit` names one unit in log lines ("step", "cell", "module").
    pub fn new(total: usize, what: &str, unit: &'static str, quiet: bool) -> Self {
        let sink = if quiet || total == 0 {
            Sink::Hidden
        } else {
            terminal_bar(total as u64, what).unwrap_or(Sink::Log { last_line: Instant::now(), last_tenth: 0 })
        };
        Progress {
            what: what.to_string(),
            unit,
            total: total as u64,
            pos: 0,
            start: Instant::now(),
            msg: String::new(),
            sink,
        }
    }

    /// A progress that prints nothing.
    pub fn hidden() -> Self {
        Self::new(0, "", "", true)
    }

    /// Set the message shown after the counts (e.g. the current loss).
    pub fn set_message(&mut self, msg: impl Into<String>) {
        self.msg = msg.into();
        #[cfg(feature = "cli")]
        if let Sink::Bar(pb) = &self.sink {
            pb.set_message(self.msg.clone());
        }
    }

    /// Advance by `n` units.
    pub fn inc(&mut self, n: usize) {
        self.pos = (self.pos + n as u64).min(self.total);
        match &mut self.sink {
            Sink::Hidden => {}
            #[cfg(feature = "cli")]
            Sink::Bar(pb) => pb.set_position(self.pos),
            Sink::Log { last_line, last_tenth } => {
                let tenth = self.pos * 10 / self.total.max(1);
                if tenth > *last_tenth || last_line.elapsed() >= LOG_EVERY || self.pos == self.total {
                    *last_tenth = tenth;
                    *last_line = Instant::now();
                    let el = self.start.elapsed().as_secs_f64();
                    let eta = el / self.pos.max(1) as f64 * (self.total - self.pos) as f64;
                    let msg = if self.msg.is_empty() { String::new() } else { format!(" {}", self.msg) };
                    eprintln!(
                        "{}: {} {}/{}{msg} elapsed {el:.0}s eta {eta:.0}s",
                        self.what, self.unit, self.pos, self.total
                    );
                }
            }
        }
    }

    /// A line of its own (e.g. one finished sweep cell), printed above a bar or as a log line.
    pub fn println(&self, line: &str) {
        match &self.sink {
            Sink::Hidden => {}
            #[cfg(feature = "cli")]
            Sink::Bar(pb) => pb.println(line),
            Sink::Log { .. } => eprintln!("{line}"),
        }
    }

    /// Remove a terminal bar (log lines stay).
    pub fn finish(&self) {
        #[cfg(feature = "cli")]
        if let Sink::Bar(pb) = &self.sink {
            pb.finish_and_clear();
        }
    }
}

/// A bar with ETA (`indicatif`) when stderr is a terminal.
#[cfg(feature = "cli")]
fn terminal_bar(total: u64, what: &str) -> Option<Sink> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{what} [{{bar:30}}] {{pos}}/{{len}} {{elapsed}} eta {{eta}} {{msg}}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    Some(Sink::Bar(pb))
}

/// Without the `cli` feature there is no bar: log lines everywhere.
#[cfg(not(feature = "cli"))]
fn terminal_bar(_total: u64, _what: &str) -> Option<Sink> {
    None
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
