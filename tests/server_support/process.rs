//! `specula serve` as a child process: what an operator runs, signals and `ulimit` included.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `specula serve`; killed when dropped.
pub struct Served {
    pub child: Child,
    pub addr: SocketAddr,
    /// Everything it wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
}

/// How a `specula serve` that was expected to refuse its settings ended.
#[derive(Debug)]
pub enum Start {
    Refused {
        status: ExitStatus,
        stderr: String,
    },
    /// It started serving instead (and was killed).
    Served {
        stderr: String,
    },
}

fn command(args: &[&str], env: &[(&str, &str)], fd_limit: Option<u64>) -> Command {
    let exe = env!("CARGO_BIN_EXE_specula");
    let mut cmd = match fd_limit {
        // `ulimit -n` sets the soft and the hard limit: the server cannot raise it.
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" serve \"$@\"")).arg(exe);
            c
        }
        None => {
            let mut c = Command::new(exe);
            c.arg("serve");
            c
        }
    };
    cmd.args(args).env_remove("SPECULA_API_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

/// Starts it, and reads its stderr into a log on a thread, each line also sent on the channel.
fn launch(mut cmd: Command) -> (Child, Arc<Mutex<String>>, mpsc::Receiver<String>) {
    let mut child = cmd.spawn().expect("specula starts");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = tx.send(line);
        }
    });
    (child, log, rx)
}

/// `specula serve --port 0 ARGS`, once it says where it listens.
pub fn serve(args: &[&str], fd_limit: Option<u64>) -> Served {
    let mut all = vec!["--port", "0"];
    all.extend_from_slice(args);
    let (child, log, lines) = launch(command(&all, &[], fd_limit));
    let start = Instant::now();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("specula serve did not start:\n{}", log.lock().unwrap()));
        if let Some(url) = line.split("on http://").nth(1) {
            let addr = url.split_whitespace().next().unwrap().parse().expect("an address");
            return Served { child, addr, log };
        }
        assert!(start.elapsed() < Duration::from_secs(120));
    }
}

/// `specula serve --port 0 ARGS` with `env`, expected to refuse to start.
pub fn refused(args: &[&str], env: &[(&str, &str)]) -> Start {
    let mut all = vec!["--port", "0"];
    all.extend_from_slice(args);
    let (mut child, log, lines) = launch(command(&all, env, None));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(50)); // the last lines
            return Start::Refused { status, stderr: log.lock().unwrap().clone() };
        }
        if lines.try_iter().any(|l| l.contains("serving")) || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Start::Served { stderr: log.lock().unwrap().clone() };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Served {
    /// Sends a signal (`TERM`, `INT`) to the server.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(status.expect("kill runs").success());
    }

    /// Waits up to `limit` for the server to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
