//! Throwaway PostgreSQL servers for tests: `initdb` in a temporary
//! directory, `postgres` on a free port of 127.0.0.1 with `fsync=off`.
//! [`shared`] is one server per test binary (started on first use), and
//! [`database`] makes a fresh database on it per call; [`Server::start`]
//! makes a private server (for tests that restart it), stopped on drop.
//!
//! Every server is spawned by a thread that never exits, with
//! `PR_SET_PDEATHSIG = SIGQUIT`, so it dies with the test binary even if that
//! is killed (the signal fires when the spawning *thread* ends, hence the
//! long-lived thread). On a normal exit an `atexit` hook stops the shared
//! server and removes its directory.
//!
//! Binaries are looked up in `$SWITCHYARD_PG_BIN`, then
//! `/usr/lib/postgresql/<newest>/bin`, then `pg_config --bindir`. If none is
//! found the tests **fail** with a message saying so (install `postgresql`).
//! Running as root, the servers run as the `postgres` user.
#![allow(dead_code)]

use std::ffi::CString;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

static SHARED: OnceLock<Result<Server, String>> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running server with its own data directory.
pub struct Server {
    /// Port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
}

/// The server shared by the tests of this binary. Panics with a clear
/// message if PostgreSQL is not installed or does not start.
pub fn shared() -> &'static Server {
    let result = SHARED.get_or_init(|| {
        let server = Server::start()?;
        // SAFETY: registering a plain extern "C" fn.
        unsafe {
            libc::atexit(stop_shared);
        }
        Ok(server)
    });
    match result {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

extern "C" fn stop_shared() {
    if let Some(Ok(server)) = SHARED.get() {
        server.stop();
        let _ = std::fs::remove_dir_all(&server.dir);
    }
}

/// A fresh, empty database on the shared server; returns its URL.
pub async fn database() -> String {
    shared().database().await
}

impl Server {
    /// initdb + start. Errors say what is missing.
    pub fn start() -> Result<Server, String> {
        let bin = find_bin()?;
        let user = run_as();
        let dir = std::env::temp_dir().join(format!(
            "switchyard-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        if let Some((uid, gid)) = user {
            let path = CString::new(dir.as_os_str().to_string_lossy().as_bytes()).unwrap();
            // SAFETY: chown of a directory we just created.
            if unsafe { libc::chown(path.as_ptr(), uid, gid) } != 0 {
                return Err(format!(
                    "chown {}: {}",
                    dir.display(),
                    std::io::Error::last_os_error()
                ));
            }
        }
        let out = command(&bin, "initdb", user, false)
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .map_err(|e| format!("run initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let server = Server {
            port: free_port(),
            dir,
            bin,
            user,
            child: Mutex::new(None),
        };
        server.launch()?;
        Ok(server)
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a fresh database and returns its URL.
    pub async fn database(&self) -> String {
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect to the test server");
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        drop(client);
        let _ = task.await;
        self.url(&name)
    }

    fn launch(&self) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        let (bin, dir, user, port) = (self.bin.clone(), self.dir.clone(), self.user, self.port);
        std::thread::Builder::new()
            .name("pg-harness".into())
            .spawn(move || {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("server.log"));
                let mut cmd = command(&bin, "postgres", user, true);
                cmd.arg("-D")
                    .arg(dir.join("data"))
                    .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
                    .arg(&dir)
                    .args([
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "max_connections=300",
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null());
                match log {
                    Ok(f) => cmd.stderr(f),
                    Err(_) => cmd.stderr(Stdio::null()),
                };
                let _ = tx.send(cmd.spawn().map_err(|e| format!("start postgres: {e}")));
                // Live as long as the process: the server's PDEATHSIG is tied
                // to this thread.
                loop {
                    std::thread::park();
                }
            })
            .map_err(|e| format!("spawn the harness thread: {e}"))?;
        let child = rx.recv().map_err(|e| format!("harness thread: {e}"))??;
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if let Some(child) = self.child.lock().unwrap().as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log =
                        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                    return Err(format!("postgres exited at start ({status}):\n{log}"));
                }
            }
            if Instant::now() > deadline {
                return Err("postgres did not accept connections within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal_and_wait(&self, sig: libc::c_int) {
        let child = self.child.lock().ok().and_then(|mut c| c.take());
        if let Some(mut child) = child {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, sig);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    /// Fast shutdown (SIGINT), waiting for it.
    pub fn stop(&self) {
        self.signal_and_wait(libc::SIGINT);
    }

    /// Kills the server the way a crash would (immediate shutdown), then
    /// starts it again on the same port and data (crash recovery).
    pub fn restart(&self) {
        self.signal_and_wait(libc::SIGQUIT);
        self.launch().expect("restart postgres");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_bin() -> Result<PathBuf, String> {
    let has = |d: &Path| d.join("postgres").is_file() && d.join("initdb").is_file();
    if let Some(d) = std::env::var_os("SWITCHYARD_PG_BIN") {
        let d = PathBuf::from(d);
        if has(&d) {
            return Ok(d);
        }
        return Err(format!(
            "SWITCHYARD_PG_BIN={} holds no `postgres` and `initdb`",
            d.display()
        ));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has(&d) {
            return Ok(d);
        }
    }
    Err(
        "PostgreSQL server binaries (`initdb`, `postgres`) not found: the PostgreSQL \
         store tests need a real server. Install the `postgresql` package or set \
         SWITCHYARD_PG_BIN to the directory holding them."
            .into(),
    )
}

/// uid/gid to run the server as (the `postgres` user when we are root).
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: plain libc calls; getpwnam's result is read at once.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let name = CString::new("postgres").unwrap();
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return Some((65534, 65534)); // nobody
        }
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn command(bin: &Path, prog: &str, user: Option<(u32, u32)>, deathsig: bool) -> Command {
    let mut cmd = Command::new(bin.join(prog));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After the uid change (which would clear it).
            if deathsig && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}
