//! Throwaway PostgreSQL servers: `initdb` in a temporary directory, then
//! `postgres` on a free port of 127.0.0.1 with `fsync=off` (no durability
//! against a machine crash: for tests and benchmarks only). Commits stay
//! synchronous, so a crash of the server process itself (see
//! [`PgServer::restart`]) loses nothing that was acknowledged. Used by the test harnesses and by
//! `switchyard bench --store postgres`.
//!
//! ```no_run
//! # async fn demo() -> switchyard_core::Result<()> {
//! let server = switchyard_store::pg_server::PgServer::start()?;
//! let url = server.create_database("bench").await?;
//! // ... open a store on `url` ...
//! drop(server); // stops the server and removes its directory
//! # Ok(()) }
//! ```
//!
//! Every server is spawned by a thread that never exits, with
//! `PR_SET_PDEATHSIG = SIGQUIT`, so it dies with the process even if that is
//! killed (the signal fires when the spawning *thread* ends, hence the
//! long-lived thread). Dropping a [`PgServer`] stops it (fast shutdown) and
//! removes its directory.
//!
//! Binaries are looked up in `$SWITCHYARD_PG_BIN`, then
//! `/usr/lib/postgresql/<newest>/bin`, then `pg_config --bindir`. If none is
//! found, [`PgServer::start`] fails with a [`Error::Config`] saying to install
//! `postgresql` (or set `SWITCHYARD_PG_BIN`). Running as root, the server
//! runs as the `postgres` user (or `nobody` when there is none).

use std::ffi::CString;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use switchyard_core::{Error, Result};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running throwaway server with its own data directory; stopped (and the
/// directory removed) on drop.
pub struct PgServer {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn store_err(msg: String) -> Error {
    Error::Store(msg)
}

impl PgServer {
    /// initdb + start, waiting until the server accepts connections. The
    /// error says what is missing or what went wrong (with the server log).
    pub fn start() -> Result<PgServer> {
        let bin = find_bin().map_err(Error::Config)?;
        let user = run_as();
        let dir = std::env::temp_dir().join(format!(
            "switchyard-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| store_err(format!("create {}: {e}", dir.display())))?;
        // From here on the directory is removed on every error path (Drop).
        let mut server = PgServer {
            port: 0,
            dir,
            bin,
            user,
            child: Mutex::new(None),
        };
        server.init()?;
        server.port = free_port()?;
        server.launch()?;
        Ok(server)
    }

    fn init(&self) -> Result<()> {
        if let Some((uid, gid)) = self.user {
            let path = CString::new(self.dir.as_os_str().to_string_lossy().as_bytes())
                .map_err(|e| store_err(format!("temporary directory name: {e}")))?;
            // SAFETY: chown of a directory we just created.
            if unsafe { libc::chown(path.as_ptr(), uid, gid) } != 0 {
                return Err(store_err(format!(
                    "chown {}: {}",
                    self.dir.display(),
                    std::io::Error::last_os_error()
                )));
            }
        }
        let out = command(&self.bin, "initdb", self.user, false)
            .arg("-D")
            .arg(self.dir.join("data"))
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
            .map_err(|e| store_err(format!("run initdb: {e}")))?;
        if !out.status.success() {
            return Err(store_err(format!(
                "initdb failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// One server per process, for test suites: started on first use (later
    /// calls get the same server, or the same error), stopped and its
    /// directory removed when the process exits normally (an `atexit`
    /// hook; a killed process still takes the server with it, see the
    /// module docs).
    pub fn shared() -> Result<&'static PgServer> {
        static SHARED: OnceLock<Result<PgServer>> = OnceLock::new();
        extern "C" fn stop_shared() {
            if let Some(Ok(server)) = SHARED.get() {
                server.stop_and_remove();
            }
        }
        SHARED
            .get_or_init(|| {
                let server = PgServer::start()?;
                // SAFETY: registering a plain extern "C" fn without captures.
                unsafe {
                    libc::atexit(stop_shared);
                }
                Ok(server)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of the `postgres` maintenance database.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `name` (which may not exist yet).
    pub fn url_of(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates database `name` and returns its URL. The name must be a plain
    /// identifier (ASCII letters, digits, `_`, not starting with a digit).
    pub async fn create_database(&self, name: &str) -> Result<String> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(Error::InvalidInput(format!(
                "database name `{name}`: use ASCII letters, digits and `_` (at most 63, \
                 not starting with a digit)"
            )));
        }
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .map_err(|e| store_err(format!("connect to the throwaway server: {e}")))?;
        let task = tokio::spawn(conn);
        let created = client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|e| store_err(format!("create database {name}: {e}")));
        drop(client);
        let _ = task.await;
        created?;
        Ok(self.url_of(name))
    }

    /// Creates a database with a fresh, unique name and returns its URL.
    pub async fn fresh_database(&self) -> Result<String> {
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        self.create_database(&name).await
    }

    fn launch(&self) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        let (bin, dir, user, port) = (self.bin.clone(), self.dir.clone(), self.user, self.port);
        std::thread::Builder::new()
            .name("pg-server".into())
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
            .map_err(|e| store_err(format!("spawn the server thread: {e}")))?;
        let child = rx
            .recv()
            .map_err(|e| store_err(format!("server thread: {e}")))?
            .map_err(store_err)?;
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if let Some(child) = self
                .child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                if let Ok(Some(status)) = child.try_wait() {
                    let log =
                        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                    return Err(store_err(format!(
                        "postgres exited at start ({status}):\n{log}"
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(store_err(
                    "postgres did not accept connections within 60 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal_and_wait(&self, sig: libc::c_int) {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
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

    /// Fast shutdown (SIGINT), waiting for it. Idempotent; the directory
    /// stays until drop.
    pub fn stop(&self) {
        self.signal_and_wait(libc::SIGINT);
    }

    /// Stops the server and removes its directory (as drop does).
    pub fn stop_and_remove(&self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Kills the server the way a crash would (immediate shutdown), then
    /// starts it again on the same port and data (crash recovery).
    pub fn restart(&self) -> Result<()> {
        self.signal_and_wait(libc::SIGQUIT);
        self.launch()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_and_remove();
    }
}

fn find_bin() -> Result<PathBuf, String> {
    find_bin_in(std::env::var_os("SWITCHYARD_PG_BIN"))
}

/// [`find_bin`] with the value of `$SWITCHYARD_PG_BIN` given.
fn find_bin_in(env: Option<std::ffi::OsString>) -> Result<PathBuf, String> {
    let has = |d: &Path| d.join("postgres").is_file() && d.join("initdb").is_file();
    if let Some(d) = env {
        let d = PathBuf::from(d);
        if has(&d) {
            return Ok(d);
        }
        return Err(format!(
            "SWITCHYARD_PG_BIN={} holds no `postgres` and `initdb`: point it at the \
             directory holding the PostgreSQL server binaries, or unset it and install \
             the `postgresql` package",
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
        "PostgreSQL server binaries (`initdb`, `postgres`) not found: a throwaway \
         server needs them. Install the `postgresql` package (e.g. `apt-get install \
         postgresql`) or set SWITCHYARD_PG_BIN to the directory holding them."
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

fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| store_err(format!("find a free port on 127.0.0.1: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_pg_bin_says_what_to_do() {
        let e = find_bin_in(Some("/nonexistent/switchyard-pg-bin".into())).unwrap_err();
        assert!(e.contains("SWITCHYARD_PG_BIN=/nonexistent"), "{e}");
        assert!(e.contains("install the `postgresql` package"), "{e}");
    }

    /// Needs the PostgreSQL server binaries (as the PostgreSQL contract
    /// tests do): fails, saying to install them, when they are missing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn start_create_database_and_stop_on_drop() {
        let server = tokio::task::spawn_blocking(PgServer::start)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        let dir = server.dir.clone();
        let port = server.port();
        assert!(dir.join("data").is_dir());
        assert!(server.url().ends_with(&format!(":{port}/postgres")));

        let url = server.create_database("pg_server_test").await.unwrap();
        assert_eq!(url, server.url_of("pg_server_test"));
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        let db: String = client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(db, "pg_server_test");
        drop(client);
        let _ = task.await;

        // Names are checked, not quoted blindly; a second create fails.
        for bad in ["", "1abc", "a-b", "a\"b", "x; DROP DATABASE postgres"] {
            assert!(
                matches!(
                    server.create_database(bad).await,
                    Err(Error::InvalidInput(_))
                ),
                "{bad:?} accepted"
            );
        }
        assert!(server.create_database("pg_server_test").await.is_err());
        let fresh = server.fresh_database().await.unwrap();
        assert_ne!(fresh, url);

        tokio::task::spawn_blocking(move || drop(server))
            .await
            .unwrap();
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(
            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_err(),
            "the server still accepts connections after drop"
        );
    }
}
