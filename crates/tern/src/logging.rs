//! Log lines to stderr in batches.
//!
//! A busy server logs two lines per accepted message (the session's `queued`, the delivery
//! log's `received`); written one by one, that is two `write(2)` calls on the threads that run
//! sessions and the queue, each also waking whatever reads the other end (journald, a file).
//! Here log lines are appended to a buffer, and a thread of their own writes the buffer out a
//! few milliseconds after its first line, so a burst of lines costs one write. What this gives
//! up: the lines of the last [`FLUSH_DELAY`] before a SIGKILL or a power cut (the spool, not
//! the log, is the record of what was accepted; the delivery log file has a 20 ms window).
//! A panic or a normal exit flushes first, and lines logged after the exit's flush are written
//! at once. On a terminal nothing is batched.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a first line waits for company before the buffer is written.
pub const FLUSH_DELAY: Duration = Duration::from_millis(10);

/// Past this many buffered bytes the writer stops batching and writes in the caller's thread,
/// as an unbatched stderr would: a stuck reader slows logging down instead of growing memory.
/// So does every line after the [`FlushGuard`] is dropped.
const MAX_BUFFERED: usize = 4 << 20;

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    stopping: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a buffer of whole lines; keep logging.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes out everything buffered. Callers hold the stderr lock (`out`) while the buffer is
    /// taken and written, so batches reach stderr in the order they were taken.
    fn flush_to(&self, out: &mut impl Write, spare: &mut Vec<u8>) -> io::Result<()> {
        std::mem::swap(&mut self.state().buf, spare);
        let written = out.write_all(spare);
        spare.clear();
        written
    }
}

/// A [`MakeWriter`] for `tracing_subscriber` that batches its lines to stderr.
#[derive(Clone)]
pub struct BatchedStderr {
    shared: Arc<Shared>,
}

/// Stops the writer thread and flushes what is left when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchedStderr {
    /// Starts the thread that writes the batches.
    pub fn start() -> io::Result<(Self, FlushGuard)> {
        Self::start_with(|| io::stderr().lock())
    }

    /// [`BatchedStderr::start`] with another destination (for tests).
    fn start_with<W, F>(out: F) -> io::Result<(Self, FlushGuard)>
    where
        W: Write,
        F: Fn() -> W + Send + 'static,
    {
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new().name("tern-log".into()).spawn({
            let shared = shared.clone();
            move || write_batches(&shared, out)
        })?;
        Ok((
            Self {
                shared: shared.clone(),
            },
            FlushGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// Writes out what is buffered now, in this thread (for a panic hook).
    pub fn flush_now(&self) {
        let mut out = io::stderr().lock();
        let _ = self.shared.flush_to(&mut out, &mut Vec::new());
    }
}

fn write_batches<W: Write>(shared: &Shared, out: impl Fn() -> W) {
    let mut spare = Vec::new();
    loop {
        let mut state = shared.state();
        while state.buf.is_empty() && !state.stopping {
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let stopping = state.stopping;
        drop(state);
        if !stopping {
            std::thread::sleep(FLUSH_DELAY);
        }
        // `out()` takes the stderr lock before the buffer is taken (see `flush_to`). Nowhere
        // to report a failed write of the log itself.
        let _ = shared.flush_to(&mut out(), &mut spare);
        if stopping {
            return;
        }
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = LineSink<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineSink(&self.shared)
    }
}

/// One event's writer: tracing's fmt layer formats a whole line, then writes it in one call.
pub struct LineSink<'a>(&'a Shared);

impl Write for LineSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut state = self.0.state();
        // Past the guard (late lines of a shutdown) there is no thread to write a batch.
        if state.stopping || state.buf.len() + data.len() > MAX_BUFFERED {
            drop(state);
            let mut out = io::stderr().lock();
            self.0.flush_to(&mut out, &mut Vec::new())?;
            out.write_all(data)?;
            return Ok(data.len());
        }
        let was_empty = state.buf.is_empty();
        state.buf.extend_from_slice(data);
        drop(state);
        if was_empty {
            self.0.wake.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.state().stopping = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<Vec<u8>>>>);

    struct Chunk(Captured, Vec<u8>);

    impl Write for Chunk {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.1.extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Drop for Chunk {
        fn drop(&mut self) {
            if !self.1.is_empty() {
                self.0 .0.lock().unwrap().push(std::mem::take(&mut self.1));
            }
        }
    }

    fn started() -> (BatchedStderr, FlushGuard, Captured) {
        let captured = Captured::default();
        let (writer, guard) = BatchedStderr::start_with({
            let captured = captured.clone();
            move || Chunk(captured.clone(), Vec::new())
        })
        .unwrap();
        (writer, guard, captured)
    }

    #[test]
    fn a_burst_of_lines_is_one_write_in_order_soon_after() {
        let (writer, guard, captured) = started();
        let start = Instant::now();
        for i in 0..100 {
            writeln!(writer.make_writer(), "line {i}").unwrap();
        }
        while captured.0.lock().unwrap().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(5), "never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        let chunks = captured.0.lock().unwrap().clone();
        assert_eq!(chunks.len(), 1, "one write for the burst");
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8(chunks[0].clone()).unwrap(), expected);
        drop(guard);
    }

    #[test]
    fn lines_after_the_guard_are_not_kept_in_the_buffer() {
        let (writer, guard, _captured) = started();
        drop(guard);
        // Written straight to the real stderr (not captured): what matters is that nothing
        // stays behind in a buffer no thread will write.
        writeln!(writer.make_writer(), "after the end").unwrap();
        assert!(writer.shared.state().buf.is_empty());
    }

    #[test]
    fn dropping_the_guard_writes_what_is_left() {
        let (writer, guard, captured) = started();
        writeln!(writer.make_writer(), "last words").unwrap();
        drop(guard);
        let all: Vec<u8> = captured.0.lock().unwrap().concat();
        assert_eq!(all, b"last words\n");
    }
}
