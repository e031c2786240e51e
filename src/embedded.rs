//! A throwaway PostgreSQL server in a temporary directory, with `wal_level=logical`: what the
//! demo runs against, and what the integration tests start for themselves.
//!
//! PostgreSQL refuses to run as root; when we are root the server's commands run as the
//! `postgres` user (through `runuser`) and the directory is handed to that user.
//!
//! The binaries are found through `PHILOTES_PG_BINDIR`, then `pg_config --bindir`, then
//! `PATH`, then the newest `/usr/lib/postgresql/*/bin` (Debian's layout).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running server. Dropping it stops the server and deletes its files.
pub struct Cluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    pub port: u16,
    password: String,
    as_postgres: bool,
    running: bool,
}

/// Options for [`Cluster::start`].
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
    /// Extra `pg_hba.conf` lines, placed before the defaults.
    pub extra_hba: Vec<String>,
    /// Files to place in the data directory before start (name, contents, mode).
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// `wal_level`; default `logical`.
    pub wal_level: Option<String>,
    /// The directory holding `initdb`, `pg_ctl` and `postgres`; default [`find_bindir`].
    pub bindir: Option<PathBuf>,
}

/// Finds the directory holding `initdb`, `pg_ctl` and `postgres`.
pub fn find_bindir() -> Result<PathBuf> {
    let complete = |d: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(d) = std::env::var_os("PHILOTES_PG_BINDIR") {
        let d = PathBuf::from(d);
        if complete(&d) {
            return Ok(d);
        }
        bail!(
            "PHILOTES_PG_BINDIR={} does not hold initdb, pg_ctl and postgres",
            d.display()
        );
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && complete(&d) {
            return Ok(d);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if complete(&d) {
                return Ok(d);
            }
        }
    }
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    debian.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(d) = debian.into_iter().rev().find(|d| complete(d)) {
        return Ok(d);
    }
    bail!(
        "PostgreSQL server binaries not found: install the PostgreSQL server (Debian: apt-get install postgresql) \
         or set PHILOTES_PG_BINDIR to the directory holding initdb, pg_ctl and postgres"
    )
}

fn is_root() -> bool {
    // `id -u` spares a libc dependency for one call.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn random_password() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("pw-{:016x}", h.finish())
}

impl Cluster {
    /// Initialises and starts a server listening on 127.0.0.1 with a fresh port.
    pub fn start(opts: ClusterOptions) -> Result<Cluster> {
        let bindir = match &opts.bindir {
            Some(d) => d.clone(),
            None => find_bindir()?,
        };
        let as_postgres = is_root();
        let dir = tempfile::Builder::new().prefix("philotes-pg-").tempdir()?;
        let mut cluster = Cluster {
            dir,
            bindir,
            port: free_port()?,
            password: random_password(),
            as_postgres,
            running: false,
        };
        let pwfile = cluster.dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", cluster.password))?;
        if as_postgres {
            chown_to_postgres(cluster.dir.path())?;
            chown_to_postgres(&pwfile)?;
        }
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--pwfile",
                path_str(&pwfile)?,
                "--no-sync",
            ],
        )?;
        let mut conf = vec![
            format!("port = {}", cluster.port),
            "listen_addresses = '127.0.0.1'".into(),
            format!(
                "unix_socket_directories = '{}'",
                path_str(cluster.dir.path())?
            ),
            format!(
                "wal_level = {}",
                opts.wal_level.as_deref().unwrap_or("logical")
            ),
            "max_replication_slots = 40".into(),
            "max_wal_senders = 40".into(),
            "max_connections = 200".into(),
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "shared_buffers = 64MB".into(),
            "max_wal_size = 2GB".into(),
            "logical_decoding_work_mem = 64MB".into(),
        ];
        conf.extend(opts.extra_conf.iter().cloned());
        append(&data.join("postgresql.conf"), &conf.join("\n"))?;
        if !opts.extra_hba.is_empty() {
            let hba = data.join("pg_hba.conf");
            let old = std::fs::read_to_string(&hba)?;
            std::fs::write(&hba, format!("{}\n{old}", opts.extra_hba.join("\n")))?;
        }
        for (name, contents, mode) in &opts.files {
            let p = data.join(name);
            std::fs::write(&p, contents)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
            if as_postgres {
                chown_to_postgres(&p)?;
            }
        }
        cluster.start_server()?;
        Ok(cluster)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A hot standby of `primary`, from a copy of its data directory taken while it is
    /// stopped (the primary is started again): streaming from it with `primary_conninfo`,
    /// plus `extra_conf` (e.g. `primary_slot_name`, `sync_replication_slots`).
    pub fn standby_of(primary: &mut Cluster, extra_conf: &[String]) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("philotes-pg-").tempdir()?;
        let standby = Cluster {
            dir,
            bindir: primary.bindir.clone(),
            port: free_port()?,
            password: primary.password.clone(),
            as_postgres: primary.as_postgres,
            running: false,
        };
        if standby.as_postgres {
            chown_to_postgres(standby.dir.path())?;
        }
        primary.stop_server("fast")?;
        let copied = {
            let mut cp = if standby.as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--", "cp"]);
                c
            } else {
                Command::new("cp")
            };
            cp.arg("-a")
                .arg(primary.data_dir())
                .arg(standby.data_dir())
                .status()
        };
        primary.start_server()?;
        if !copied.is_ok_and(|s| s.success()) {
            bail!("cannot copy the primary's data directory");
        }
        let data = standby.data_dir();
        // As pg_basebackup does: the primary's slots are its own (a standby gets copies of
        // failover slots from its slot sync worker).
        for slot in std::fs::read_dir(data.join("pg_replslot"))? {
            std::fs::remove_dir_all(slot?.path())?;
        }
        let mut conf = vec![
            format!("port = {}", standby.port),
            format!(
                "unix_socket_directories = '{}'",
                path_str(standby.dir.path())?
            ),
            format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres password={} dbname=postgres'",
                primary.port, primary.password
            ),
            "hot_standby = on".into(),
        ];
        conf.extend(extra_conf.iter().cloned());
        append(&data.join("postgresql.conf"), &conf.join("\n"))?;
        let signal = data.join("standby.signal");
        std::fs::write(&signal, "")?;
        if standby.as_postgres {
            chown_to_postgres(&signal)?;
        }
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        let mut standby = standby;
        standby.start_server()?;
        Ok(standby)
    }

    /// Promotes a standby to a primary (a new timeline), waiting until it is one.
    pub fn promote(&self) -> Result<()> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &["-D", path_str(&data)?, "-w", "-t", "60", "promote"],
        )
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// URI for database `db` as the superuser, over TCP with the password.
    pub fn uri(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}?sslmode=disable",
            self.password, self.port
        )
    }

    /// Starts the (stopped) server again on the same port.
    pub fn start_server(&mut self) -> Result<()> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .with_context(|| {
            format!(
                "PostgreSQL did not start; its log says:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        self.running = true;
        Ok(())
    }

    /// Stops the server: `fast` (clean) or `immediate` (like a crash).
    pub fn stop_server(&mut self, mode: &str) -> Result<()> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &["-D", path_str(&data)?, "-m", mode, "-w", "stop"],
        )?;
        self.running = false;
        Ok(())
    }

    /// Waits until the server accepts TCP connections (after a restart).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if start.elapsed() > timeout {
                bail!(
                    "PostgreSQL on port {} not ready after {timeout:?}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// For a server kept for a whole process (a test binary's shared server, which a static
    /// never drops): a watcher stops it and removes its files once this process has exited.
    pub fn stop_when_process_exits(&self) -> Result<()> {
        let pid = std::process::id();
        let pg_ctl = self.bindir.join("pg_ctl");
        let data = self.data_dir();
        let stop = format!(
            "{}'{}' -D '{}' -m immediate -w stop",
            if self.as_postgres {
                "runuser -u postgres -- "
            } else {
                ""
            },
            path_str(&pg_ctl)?,
            path_str(&data)?
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf '{}'",
            path_str(self.dir.path())?
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the server's watcher")?;
        Ok(())
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let bin = self.bindir.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{program} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            if let Ok(data) = path_str(&self.data_dir()) {
                let _ = self.run("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
            }
        }
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("temporary path is not UTF-8")
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    writeln!(f, "\n{text}")?;
    Ok(())
}

fn chown_to_postgres(path: &Path) -> Result<()> {
    let out = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .output()
        .context("cannot run chown")?;
    if !out.status.success() {
        bail!(
            "cannot hand {} to the postgres user (PostgreSQL refuses to run as root): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
