//! A child process's output, read line by line on a background thread, for the process-level
//! tests to wait on (with a bound) instead of sleeping.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Lines read so far from one of the child's pipes, and whether the pipe has closed.
#[derive(Default)]
pub struct Lines {
    lines: Mutex<(Vec<String>, bool)>,
    changed: Condvar,
}

impl Lines {
    /// Reads `pipe` line by line on a background thread until it closes (so the pipe never
    /// fills and blocks the child).
    pub fn collect(pipe: impl Read + Send + 'static) -> (Arc<Lines>, JoinHandle<()>) {
        let lines = Arc::new(Lines::default());
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                sink.lines.lock().unwrap().0.push(line);
                sink.changed.notify_all();
            }
            sink.lines.lock().unwrap().1 = true;
            sink.changed.notify_all();
        });
        (lines, reader)
    }

    /// The first line satisfying `pred`, waiting up to `timeout` for it.
    /// Like [`collect`](Self::collect), for two pipes (a process's stdout and stderr) into one
    /// list; it ends when both have.
    pub fn collect_merged(
        a: impl Read + Send + 'static,
        b: impl Read + Send + 'static,
    ) -> (Arc<Lines>, JoinHandle<()>) {
        let lines = Arc::new(Lines::default());
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(2));
        let reader = |pipe: Box<dyn Read + Send>| {
            let (sink, open) = (lines.clone(), open.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    sink.lines.lock().unwrap().0.push(line);
                    sink.changed.notify_all();
                }
                if open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
                    sink.lines.lock().unwrap().1 = true;
                    sink.changed.notify_all();
                }
            })
        };
        reader(Box::new(a));
        let handle = reader(Box::new(b));
        (lines, handle)
    }

    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.wait_for_n(1, timeout, pred).map(|mut v| v.remove(0))
    }

    /// Waits up to `timeout` until at least `n` lines satisfy `pred`; returns them.
    pub fn wait_for_n(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<Vec<String>> {
        let until = Instant::now() + timeout;
        let mut guard = self.lines.lock().unwrap();
        loop {
            let found: Vec<String> = guard.0.iter().filter(|l| pred(l)).cloned().collect();
            if found.len() >= n {
                return Some(found);
            }
            let now = Instant::now();
            if guard.1 || now >= until {
                return None;
            }
            guard = self.changed.wait_timeout(guard, until - now).unwrap().0;
        }
    }

    /// Everything read so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap().0.clone()
    }

    /// Waits (up to `timeout`) for the pipe to close, and returns everything read.
    pub fn all(&self, timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        let mut guard = self.lines.lock().unwrap();
        while !guard.1 && Instant::now() < until {
            let left = until.saturating_duration_since(Instant::now());
            guard = self.changed.wait_timeout(guard, left).unwrap().0;
        }
        guard.0.join("\n")
    }
}
