//! Holds one PostgreSQL backend at a chosen step of its commit, with gdb: between writing its
//! transaction's commit record (so the WAL, and a logical replication stream, carry the
//! commit) and marking the transaction committed (so no snapshot sees it yet). A loaded
//! machine can deschedule a backend there; a debugger makes that last as long as a test
//! needs.
//!
//! The breakpoint is on `TransactionIdCommitTree`, which a synchronous commit calls right
//! after flushing its commit record; the servers export it (extensions link against it).
//! `make test-deps` installs gdb. The signals a server sends its backends (SIGUSR1 for cache
//! invalidation and barriers, among others) pass through without stopping it: the backend
//! stops only at the breakpoint. The hold ends when the test releases it, when the test's
//! `CommitHold` is dropped, or after five minutes, whatever happens to the test.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct CommitHold {
    gdb: Option<Child>,
    release: PathBuf,
    _dir: tempfile::TempDir,
    lines: mpsc::Receiver<String>,
    output: Vec<String>,
    stopped: bool,
}

impl CommitHold {
    /// Attaches to backend `pid`; returns once the breakpoint is set (its next commit stops
    /// there).
    pub fn attach(pid: i32) -> CommitHold {
        let dir = tempfile::tempdir().expect("temp dir");
        let release = dir.path().join("release");
        let wait = format!(
            "shell i=0; while [ ! -e '{}' ] && [ $i -lt 15000 ]; do sleep 0.02; i=$((i+1)); done",
            release.display()
        );
        let mut gdb = Command::new("gdb")
            .args(["-q", "-nx", "-batch", "-p", &pid.to_string()])
            .args([
                "-ex",
                "handle SIGUSR1 SIGUSR2 SIGPIPE SIGALRM SIGTERM SIGQUIT SIGHUP nostop noprint pass",
            ])
            .args(["-ex", "break TransactionIdCommitTree"])
            .args(["-ex", "echo HOLD-READY\\n"])
            .args(["-ex", "continue"])
            .args(["-ex", "echo HOLD-STOPPED\\n"])
            .args(["-ex", "delete"])
            .args(["-ex", &wait])
            .args(["-ex", "detach"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run gdb ({e}): install it (apt-get install gdb; .ci/run does)")
            });
        let stdout = gdb.stdout.take().expect("gdb's stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut hold = CommitHold {
            gdb: Some(gdb),
            release,
            _dir: dir,
            lines,
            output: Vec::new(),
            stopped: false,
        };
        hold.expect("HOLD-READY", Duration::from_secs(60));
        assert!(
            hold.output.iter().any(|l| l.starts_with("Breakpoint 1 at")),
            "gdb set no breakpoint on TransactionIdCommitTree:\n{}",
            hold.output.join("\n")
        );
        hold
    }

    /// Waits until the backend stopped at the breakpoint: its commit record is written and
    /// flushed, the transaction is not marked committed.
    pub fn wait_stopped(&mut self) {
        self.expect("HOLD-STOPPED", Duration::from_secs(60));
        self.stopped = true;
        assert!(
            self.output
                .iter()
                .any(|l| l.starts_with("Breakpoint 1, ") && l.contains("TransactionIdCommitTree")),
            "the backend stopped elsewhere than at its commit:\n{}",
            self.output.join("\n")
        );
    }

    /// Lets the backend finish its commit and detaches.
    pub fn release(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        let Some(mut gdb) = self.gdb.take() else {
            return;
        };
        let _ = std::fs::write(&self.release, b"");
        let status = gdb.wait().expect("wait for gdb");
        assert!(status.success(), "gdb ended with {status}");
    }

    fn expect(&mut self, marker: &str, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.trim() == marker;
                    self.output.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!(
                    "gdb did not say {marker} within {within:?}:\n{}",
                    self.output.join("\n")
                ),
            }
        }
    }
}

impl Drop for CommitHold {
    /// Never leaves a backend stopped, or a breakpoint in it, behind a failed test: gdb still
    /// waiting for the breakpoint is interrupted (it stops the backend without passing it a
    /// signal), then goes on to detach, as the release is there already.
    fn drop(&mut self) {
        if let Some(mut gdb) = self.gdb.take() {
            let _ = std::fs::write(&self.release, b"");
            if !self.stopped {
                let _ = Command::new("kill")
                    .args(["-INT", &gdb.id().to_string()])
                    .status();
            }
            let _ = gdb.wait();
        }
    }
}
