//! The GPU workers' mailboxes: bounded crossbeam channels whose receiving thread sleeps
//! while its mailbox is empty and is woken by each send.
//!
//! crossbeam's own blocking `recv` spins and yields for a while before it sleeps: cheap
//! where cores are idle, but where every core is busy (a CPU backend, a small machine) that
//! spinning takes the core from the actors' thread, and the runtime's cost per step grew
//! by more than half at 32 rows on two cores. Here the worker only ever `try_recv`s and
//! parks; a sender unparks it after each message, and once more when it goes away, so that
//! a closed mailbox is seen at once.

use std::sync::{Arc, OnceLock};
use std::thread::{self, Thread};

use crossbeam_channel::{Receiver, Sender};
pub use crossbeam_channel::{RecvError, SendError, TryRecvError, TrySendError};

/// A bounded mailbox for a worker thread: the sending half, and the worker's half.
pub fn bounded<T>(capacity: usize) -> (MailboxSender<T>, Mailbox<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let worker = Arc::new(OnceLock::new());
    (MailboxSender { tx: Some(tx), worker: worker.clone() }, Mailbox { rx, worker })
}

pub struct MailboxSender<T> {
    /// Taken when the sender is dropped, before the worker is woken to see it.
    tx: Option<Sender<T>>,
    /// The thread that receives, once it first waited.
    worker: Arc<OnceLock<Thread>>,
}

impl<T> MailboxSender<T> {
    /// Sends unless the mailbox is full or its worker gone.
    pub fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        let sent = self.tx.as_ref().expect("present until dropped").try_send(msg);
        self.wake();
        sent
    }

    /// Sends, waiting for room if the mailbox is full.
    pub fn send(&self, msg: T) -> Result<(), SendError<T>> {
        let sent = self.tx.as_ref().expect("present until dropped").send(msg);
        self.wake();
        sent
    }

    fn wake(&self) {
        if let Some(worker) = self.worker.get() {
            worker.unpark();
        }
    }
}

impl<T> Drop for MailboxSender<T> {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.wake();
    }
}

/// The worker's half: received on its own thread only.
pub struct Mailbox<T> {
    rx: Receiver<T>,
    worker: Arc<OnceLock<Thread>>,
}

impl<T> Mailbox<T> {
    /// Whether no message waits (one may arrive right after).
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The next message, sleeping while there is none; an error once every sender is gone
    /// and the mailbox is empty.
    pub fn recv(&self) -> Result<T, RecvError> {
        // Known before the first look at the channel: a message sent after that look wakes us.
        self.worker.get_or_init(thread::current);
        loop {
            match self.rx.try_recv() {
                Ok(msg) => return Ok(msg),
                Err(TryRecvError::Disconnected) => return Err(RecvError),
                Err(TryRecvError::Empty) => thread::park(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleeping_worker_gets_every_message_then_sees_the_senders_gone() {
        let (tx, rx) = bounded(2);
        let worker = thread::spawn(move || std::iter::from_fn(|| rx.recv().ok()).collect::<Vec<u32>>());
        for i in 0..100 {
            tx.send(i).unwrap();
            if i % 10 == 0 {
                thread::sleep(std::time::Duration::from_millis(1)); // let it fall asleep
            }
        }
        drop(tx);
        assert_eq!(worker.join().unwrap(), (0..100).collect::<Vec<_>>());
    }
}
