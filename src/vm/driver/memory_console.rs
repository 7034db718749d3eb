//! The in-memory hypervisor's consoles: a guest that echoes what it is sent (as a
//! terminal does), hung up when its domain stops or another client forces it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::console::{ConsoleOpen, ConsolePipe, Ended, PipeEnd, PipeSide, StreamEnd};

/// One open console of the fake.
pub struct FakeConsole {
    output: Mutex<Option<mpsc::Sender<Bytes>>>,
    ended: Ended,
    open: AtomicBool,
}

impl FakeConsole {
    /// Starts the echoing guest side of a new pipe.
    pub fn start(side: PipeSide) -> Arc<FakeConsole> {
        let console = Arc::new(FakeConsole {
            output: Mutex::new(Some(side.output)),
            ended: side.ended,
            open: AtomicBool::new(true),
        });
        let echo = Arc::clone(&console);
        let mut input = side.input;
        std::thread::spawn(move || {
            while let Some(bytes) = input.blocking_recv() {
                let out = echo.output.lock().ok().and_then(|o| o.clone());
                match out {
                    Some(tx) if tx.blocking_send(bytes).is_ok() => {}
                    _ => break,
                }
            }
        });
        console
    }

    /// The guest side goes away (its domain stopped): the pipe's output ends.
    pub fn hang_up(&self) {
        self.ended.set(StreamEnd::Eof);
        self.stop();
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    fn stop(&self) {
        self.open.store(false, Ordering::Release);
        if let Ok(mut o) = self.output.lock() {
            *o = None;
        }
    }
}

impl PipeEnd for FakeConsole {
    fn want_input(&self) {}

    fn alive(&self) -> bool {
        true
    }

    fn close(&self) {
        self.ended.set(StreamEnd::Failed("closed".into()));
        self.stop();
    }
}

/// The fake's open consoles, by domain.
#[derive(Default)]
pub struct FakeConsoles(Mutex<Vec<(String, Arc<FakeConsole>)>>);

impl FakeConsoles {
    /// Opens domain `name`'s console (running, as the caller checked); `force` hangs up
    /// the one open, as libvirt's FORCE does.
    pub fn open(&self, name: &str, force: bool) -> ConsoleOpen {
        let mut consoles = self.0.lock().unwrap_or_else(|p| p.into_inner());
        consoles.retain(|(_, c)| c.is_open());
        if let Some((_, held)) = consoles.iter().find(|(n, _)| n == name) {
            if !force {
                return ConsoleOpen::HeldOutside;
            }
            held.hang_up();
        }
        let mut made = None;
        let pipe = ConsolePipe::new(|side| {
            let c = FakeConsole::start(side);
            made = Some(Arc::clone(&c));
            c as Arc<dyn PipeEnd>
        });
        consoles.extend(made.map(|c| (name.to_owned(), c)));
        ConsoleOpen::Opened(pipe)
    }

    /// Domain `name` stopped: its consoles hang up.
    pub fn hang_up(&self, name: &str) {
        let consoles = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (_, c) in consoles.iter().filter(|(n, _)| n == name) {
            c.hang_up();
        }
    }
}
