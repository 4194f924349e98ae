//! stdio upstreams: a child process in its own process group, speaking newline-delimited
//! JSON-RPC on stdin/stdout, its stderr drained into the log under the server's name.
//!
//! Invariants: every child runs in a new process group that is registered here until the
//! group is killed, so [`kill_all`] (called on shutdown, on signals and from the panic hook)
//! leaves no child or grandchild behind; a line longer than [`MAX_LINE`] ends the connection
//! rather than growing memory without bound.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Link, Opened, TransportError, Upstream};
use crate::config::Transport;
use crate::mcp::lines::{Line, Lines};
use crate::sharded::lock;

/// The longest message accepted from a child (64 MiB).
pub(crate) const MAX_LINE: usize = 64 * 1024 * 1024;
/// The longest stderr line logged from a child (64 KiB); longer ones are skipped.
pub(crate) const MAX_STDERR_LINE: usize = 64 * 1024;
/// How long a child gets to exit after stdin closes, and again after SIGTERM.
const GRACE: Duration = Duration::from_millis(1500);

fn groups() -> &'static Mutex<HashSet<i32>> {
    static GROUPS: OnceLock<Mutex<HashSet<i32>>> = OnceLock::new();
    GROUPS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Kills every process group Portcullis started (SIGKILL). Safe to call from a panic hook.
pub fn kill_all() {
    let all: Vec<i32> = match groups().try_lock() {
        Ok(mut g) => g.drain().collect(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().drain().collect(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for pgid in all {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

fn kill_group(pgid: i32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pgid), signal);
}

/// The writing half of a stdio connection and the handle to stop the child.
pub(crate) struct StdioLink {
    tx: mpsc::UnboundedSender<Bytes>,
    stop: CancellationToken,
    exited: CancellationToken,
}

impl StdioLink {
    pub(crate) fn send(&self, msg: Bytes) -> Result<(), TransportError> {
        self.tx.send(msg).map_err(|_| TransportError::Exited)
    }

    /// Closes stdin, then SIGTERM, then SIGKILL to the whole group, each after a grace period.
    pub(crate) async fn shutdown(&self) {
        self.stop.cancel();
        self.exited.cancelled().await;
    }
}

pub(crate) async fn spawn(up: &Arc<Upstream>) -> Result<Opened, TransportError> {
    let Transport::Stdio { command, args, env, inherit_env, cwd } = &up.def.transport else {
        return Err(TransportError::Spawn { command: String::new(), reason: "not a stdio server".into() });
    };
    let mut cmd = Command::new(command);
    // A child sees a minimal environment and its own `env`, never Portcullis' secrets.
    cmd.env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| k.to_str().is_some_and(|k| inherit_env.passes(k))))
        .args(args)
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let mut child =
        cmd.spawn().map_err(|e| TransportError::Spawn { command: command.clone(), reason: e.to_string() })?;
    let pid = child.id().ok_or(TransportError::ExitedAtOnce)?;
    let pgid = pid as i32;
    lock(groups()).insert(pgid);
    let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        kill_group(pgid, Signal::SIGKILL);
        return Err(TransportError::Spawn { command: command.clone(), reason: "no stdio pipes".into() });
    };
    let name = up.def.name.clone();
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let closed = CancellationToken::new();
    let stop = CancellationToken::new();
    let exited = CancellationToken::new();

    tokio::spawn(write_loop(stdin, rx, stop.clone()));
    tokio::spawn(drain_stderr(stderr, name.clone()));
    tokio::spawn(read_loop(stdout, Arc::downgrade(up), closed.clone(), name.clone()));
    tokio::spawn(reap(child, pgid, name, closed.clone(), stop.clone(), exited.clone()));

    Ok(Opened { link: Link::Stdio(StdioLink { tx, stop, exited }), closed, pid: Some(pid) })
}

async fn write_loop(
    mut stdin: tokio::process::ChildStdin,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = stop.cancelled() => None,
        };
        let Some(msg) = msg else { break };
        if stdin.write_all(&msg).await.is_err() || stdin.write_all(b"\n").await.is_err() {
            break;
        }
        // Batch what is already queued before flushing.
        while let Ok(more) = rx.try_recv() {
            if stdin.write_all(&more).await.is_err() || stdin.write_all(b"\n").await.is_err() {
                return;
            }
        }
        if stdin.flush().await.is_err() {
            break;
        }
    }
    // Dropping stdin closes the pipe: the child sees EOF.
}

async fn read_loop(
    stdout: tokio::process::ChildStdout,
    up: std::sync::Weak<Upstream>,
    closed: CancellationToken,
    name: String,
) {
    let mut lines = Lines::new(stdout, MAX_LINE);
    while let Some(line) = lines.next().await {
        let Line::Text(line) = line else {
            tracing::error!(server = %name, "message longer than {MAX_LINE} bytes; closing the connection");
            break;
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Some(up) = up.upgrade() else { break };
        up.on_message(line.freeze(), None);
    }
    closed.cancel();
}

async fn drain_stderr(stderr: tokio::process::ChildStderr, name: String) {
    let mut lines = Lines::new(stderr, MAX_STDERR_LINE);
    while let Some(line) = lines.next().await {
        match line {
            Line::Text(line) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                if !text.is_empty() {
                    tracing::info!(target: "portcullis::upstream::stderr", server = %name, "{text}");
                }
            }
            Line::TooLong => {
                tracing::warn!(server = %name, "a stderr line longer than {MAX_STDERR_LINE} bytes; skipped");
            }
        }
    }
}

async fn reap(
    mut child: Child,
    pgid: i32,
    name: String,
    closed: CancellationToken,
    stop: CancellationToken,
    exited: CancellationToken,
) {
    let status = tokio::select! {
        s = child.wait() => Some(s),
        _ = stop.cancelled() => None,
        _ = closed.cancelled() => None,
    };
    let asked = status.is_none();
    let status = match status {
        Some(s) => s.ok(),
        None => {
            // Asked to stop, or stdout closed: stdin is closing; give it a moment, then escalate.
            stop.cancel();
            match tokio::time::timeout(GRACE, child.wait()).await {
                Ok(s) => s.ok(),
                Err(_) => {
                    kill_group(pgid, Signal::SIGTERM);
                    match tokio::time::timeout(GRACE, child.wait()).await {
                        Ok(s) => s.ok(),
                        Err(_) => {
                            kill_group(pgid, Signal::SIGKILL);
                            child.wait().await.ok()
                        }
                    }
                }
            }
        }
    };
    // Whatever the child left in its group (grandchildren) goes with it.
    kill_group(pgid, Signal::SIGKILL);
    lock(groups()).remove(&pgid);
    match status {
        // Stopped by Portcullis (shutdown, reload, restart): expected, however it ended.
        Some(s) if asked => tracing::info!(server = %name, status = %s, "process stopped"),
        Some(s) if s.success() => tracing::info!(server = %name, "process exited"),
        Some(s) => tracing::warn!(server = %name, status = %s, "process exited"),
        None => tracing::warn!(server = %name, "process exit status unknown"),
    }
    closed.cancel();
    exited.cancel();
}
