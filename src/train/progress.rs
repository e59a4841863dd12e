//! Training progress on standard output: a live bar redrawn in place on a terminal, and on a
//! pipe or a log file (CI, Slurm, `make train > log`) one plain line per `log_every` steps,
//! since `\r` updates run together into a single line there.
//!
//! Not `indicatif`: the bar is forty lines whose output the tests pin (the plain lines a pipe
//! gets, the bar's text); indicatif would redraw at its own rate and hide itself off a
//! terminal, changing what logs and CI see for no gain here.
use std::io::{IsTerminal, Write};

/// What one progress report says.
pub struct StepReport {
    pub epoch: usize,
    pub epochs: usize,
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub eta_s: f64,
}

pub struct Progress {
    live: bool,
    every: usize,
    /// A bar is on the screen and the next plain line must start on a fresh one.
    open: bool,
}

impl Progress {
    /// `live`: redraw a bar (a terminal); else print a line every `every` steps.
    pub fn new(live: bool, every: usize) -> Self {
        Progress {
            live,
            every: every.max(1),
            open: false,
        }
    }

    /// A bar when standard output is a terminal, plain lines otherwise.
    pub fn for_stdout(every: usize) -> Self {
        Self::new(std::io::stdout().is_terminal(), every)
    }

    /// The text for `r`, or `None` when nothing is due at this step. `last`: the step ends
    /// the run or an interruption, so it is always reported.
    pub fn render(&self, r: &StepReport, last: bool) -> Option<String> {
        let due = last || r.step.is_multiple_of(self.every);
        let stats = format!(
            "epoch {}/{} step {}/{} loss {:.4} lr {:.2e} tok/s {:.0} eta {}",
            r.epoch,
            r.epochs,
            r.step,
            r.total_steps,
            r.loss,
            r.lr,
            r.tokens_per_s,
            fmt_duration(r.eta_s)
        );
        if !self.live {
            return due.then_some(stats);
        }
        const WIDTH: usize = 24;
        let filled = (r.step * WIDTH)
            .checked_div(r.total_steps)
            .unwrap_or(WIDTH)
            .min(WIDTH);
        Some(format!(
            "\r[{}{}] {stats}   ",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled)
        ))
    }

    pub fn step(&mut self, r: &StepReport, last: bool) {
        let Some(text) = self.render(r, last) else {
            return;
        };
        let mut out = std::io::stdout().lock();
        if self.live {
            let _ = write!(out, "{text}");
            self.open = true;
        } else {
            let _ = writeln!(out, "{text}");
        }
        let _ = out.flush();
    }

    /// Ends a bar that is on the screen, so the next line starts on its own.
    pub fn close(&mut self) {
        if self.open {
            println!();
            self.open = false;
        }
    }
}

fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(step: usize) -> StepReport {
        StepReport {
            epoch: 1,
            epochs: 2,
            step,
            total_steps: 20,
            loss: 0.5,
            lr: 1e-4,
            tokens_per_s: 100.0,
            eta_s: 65.0,
        }
    }

    #[test]
    fn plain_lines_every_log_every_steps_and_the_last() {
        let p = Progress::new(false, 5);
        assert_eq!(p.render(&report(3), false), None);
        let line = p.render(&report(5), false).unwrap();
        assert!(!line.contains('\r') && !line.contains('\n'), "{line:?}");
        assert!(
            line.starts_with("epoch 1/2 step 5/20 loss 0.5000"),
            "{line}"
        );
        assert!(line.ends_with("eta 1m05s"), "{line}");
        assert!(p.render(&report(7), true).is_some());
    }

    #[test]
    fn a_live_bar_redraws_every_step() {
        let p = Progress::new(true, 5);
        let bar = p.render(&report(10), false).unwrap();
        assert!(
            bar.starts_with("\r[############............] epoch 1/2"),
            "{bar}"
        );
        assert!(p.render(&report(3), false).unwrap().starts_with('\r'));
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(59.9), "0m59s");
        assert_eq!(fmt_duration(3725.0), "1h02m");
    }
}
