//! The proxy process under test: one builder for its config, flags, environment and logs.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

/// The admin listener table on a free port.
const ADMIN_TOML: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

/// `RUST_LOG` of a proxy whose builder sets none.
const DEFAULT_RUST_LOG: &str = "fhir_bulk_proxy=debug";

/// A running proxy process with its own data directory.
pub struct Proxy {
    /// Public FHIR base URL of the proxy, e.g. `http://127.0.0.1:PORT/fhir`.
    pub base: String,
    /// The data directory (kept across restarts of the same `Proxy`).
    pub data_dir: PathBuf,
    /// Admin base URL `http://127.0.0.1:PORT`, when the builder asked for an admin listener.
    pub admin: Option<String>,
    config: PathBuf,
    /// What follows `serve` on the command line, again on a restart.
    serve_args: Vec<OsString>,
    child: Child,
    _dir: Option<tempfile::TempDir>,
}

/// How a proxy that was expected to refuse to start ended.
pub struct Exited {
    /// Its exit status; `None` when it was still running at the deadline (and was killed).
    pub status: Option<ExitStatus>,
    /// What it wrote to stderr.
    pub log: String,
}

/// How `Proxy::builder(..).start()` configures and runs the process.
pub struct ProxyBuilder<'a> {
    upstream: &'a str,
    server_toml: &'a str,
    upstream_toml: &'a str,
    export_toml: &'a str,
    tables_toml: &'a str,
    admin: bool,
    global_args: &'a [&'a str],
    envs: &'a [(&'a str, &'a str)],
    log_to: Option<&'a Path>,
    rust_log: &'a str,
    open_files: Option<u64>,
    flags_only: bool,
}

impl<'a> ProxyBuilder<'a> {
    /// Appended to `[server]`.
    pub fn server_toml(mut self, toml: &'a str) -> Self {
        self.server_toml = toml;
        self
    }

    /// Appended to `[upstream]`.
    pub fn upstream_toml(mut self, toml: &'a str) -> Self {
        self.upstream_toml = toml;
        self
    }

    /// Appended to `[export]`; may go on with further tables (`[auth]`...), since only `tables` follow.
    /// The fast polling defaults (`min_poll_interval_ms = 0`, `retry_after_secs = 1`) apply unless this
    /// sets those keys, since TOML rejects a key set twice.
    pub fn export_toml(mut self, toml: &'a str) -> Self {
        self.export_toml = toml;
        self
    }

    /// Whole tables after `[export]`, e.g. `[storage]...`.
    pub fn tables(mut self, toml: &'a str) -> Self {
        self.tables_toml = toml;
        self
    }

    /// An admin listener on a free port; its URL ends up in `Proxy::admin`.
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    /// Arguments before `serve` (global flags such as `--log-format json`).
    pub fn global_args(mut self, args: &'a [&'a str]) -> Self {
        self.global_args = args;
        self
    }

    /// Extra environment variables of the process.
    pub fn envs(mut self, envs: &'a [(&'a str, &'a str)]) -> Self {
        self.envs = envs;
        self
    }

    /// Writes the process's stderr to `file` (inherited otherwise), so a test can read what it logged.
    pub fn log_to(mut self, file: &'a Path) -> Self {
        self.log_to = Some(file);
        self
    }

    /// `RUST_LOG` of the process (`fhir_bulk_proxy=debug` otherwise).
    pub fn rust_log(mut self, filter: &'a str) -> Self {
        self.rust_log = filter;
        self
    }

    /// RLIMIT_NOFILE (soft and hard) of the process; inherited otherwise.
    pub fn open_files(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self
    }

    /// No config file (and no `FBP_CONFIG`): `serve --listen 127.0.0.1:0 --upstream-url U --data-dir D`,
    /// so only the flags configure it; the TOML fragments, `admin` and `global_args` do not apply.
    pub fn flags_only(mut self) -> Self {
        self.flags_only = true;
        self
    }

    /// Writes the config into a fresh directory and starts the process; panics if it does not listen.
    pub fn start(self) -> Proxy {
        let (command, prepared) = self.command(None);
        let (child, base, admin) = spawn(command);
        Proxy {
            base,
            data_dir: prepared.data_dir,
            admin,
            config: prepared.config,
            serve_args: prepared.serve_args,
            child,
            _dir: Some(prepared.dir),
        }
    }

    /// Starts the process expecting it to exit by itself within `timeout` (a config it must refuse);
    /// kills it at the deadline. Its stderr goes to the `log_to` file, or to one in its directory.
    pub fn start_expecting_exit(self, timeout: Duration) -> Exited {
        let dir = tempfile::tempdir().unwrap();
        let stderr = self
            .log_to
            .map(Path::to_owned)
            .unwrap_or_else(|| dir.path().join("stderr"));
        let (mut command, _prepared) = self.command(Some(&stderr));
        let mut child = command.stdout(Stdio::null()).spawn().unwrap();
        let status = wait_or_kill(&mut child, timeout);
        Exited {
            status,
            log: std::fs::read_to_string(&stderr).unwrap(),
        }
    }

    /// The `serve` command with its config (or flags) written into a fresh directory; its stderr goes
    /// to `stderr`, else to the `log_to` file.
    fn command(&self, stderr: Option<&Path>) -> (Command, Prepared) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let config = dir.path().join("proxy.toml");
        let mut defaults = String::new();
        for (key, value) in [("min_poll_interval_ms", "0"), ("retry_after_secs", "1")] {
            if !sets_key(self.export_toml, key) {
                defaults.push_str(&format!("{key} = {value}\n"));
            }
        }
        let admin = if self.admin { ADMIN_TOML } else { "" };
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n{}\n\n[upstream]\nbase_url = \"{}\"\n{}\n\n\
                 [export]\ndata_dir = \"{}\"\n{defaults}{}\n\n{admin}\n{}\n",
                self.server_toml,
                self.upstream,
                self.upstream_toml,
                data_dir.display(),
                self.export_toml,
                self.tables_toml,
            ),
        )
        .unwrap();
        let serve_args: Vec<OsString> = if self.flags_only {
            vec![
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--upstream-url".into(),
                self.upstream.into(),
                "--data-dir".into(),
                data_dir.clone().into(),
            ]
        } else {
            vec!["--config".into(), config.clone().into()]
        };
        let mut command = Proxy::command(&[]);
        if self.flags_only {
            command.env_remove("FBP_CONFIG");
        } else {
            command.args(self.global_args);
        }
        command
            .arg("serve")
            .args(&serve_args)
            .env("RUST_LOG", self.rust_log)
            .envs(self.envs.iter().copied());
        if let Some(file) = stderr.or(self.log_to) {
            command.stderr(std::fs::File::create(file).unwrap());
        }
        if let Some(n) = self.open_files {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent's.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let prepared = Prepared {
            dir,
            data_dir,
            config,
            serve_args,
        };
        (command, prepared)
    }
}

/// The directory of a proxy about to start, and what goes there.
struct Prepared {
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    config: PathBuf,
    serve_args: Vec<OsString>,
}

impl Proxy {
    /// Starts the proxy in front of `upstream`; `export_toml` is appended to the `[export]` table.
    pub fn start(upstream: &str, export_toml: &str) -> Proxy {
        Proxy::builder(upstream).export_toml(export_toml).start()
    }

    /// A builder for a proxy in front of `upstream`, with nothing added to the config.
    pub fn builder(upstream: &str) -> ProxyBuilder<'_> {
        ProxyBuilder {
            upstream,
            server_toml: "",
            upstream_toml: "",
            export_toml: "",
            tables_toml: "",
            admin: false,
            global_args: &[],
            envs: &[],
            log_to: None,
            rust_log: DEFAULT_RUST_LOG,
            open_files: None,
            flags_only: false,
        }
    }

    /// The binary with `args`, for a one-shot run whose output a test reads (`.output()`): a CLI
    /// subcommand such as `jobs`, or `serve` that must refuse to start.
    pub fn command(args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fhir-bulk-proxy"));
        command.args(args);
        command
    }

    /// The admin base URL; panics when the proxy was started without `admin()`.
    pub fn admin_url(&self) -> String {
        self.admin.clone().expect("no `admin listening on` line")
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the process again on the same config and data directory (new port). The builder's flags,
    /// environment, log file and limits are not reapplied: a log file written so far stays as it was.
    pub fn restart(&mut self) {
        let mut command = Proxy::command(&["serve"]);
        command
            .args(&self.serve_args)
            .env("RUST_LOG", DEFAULT_RUST_LOG);
        let (child, base, admin) = spawn(command);
        self.child = child;
        self.base = base;
        self.admin = admin;
    }

    /// Path of the config file, for tests that need to edit it before a restart.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The process id of the running proxy.
    pub fn child_pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until_exit(&mut self.child, timeout)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `timeout` for `child` to exit by itself; `None` if it is still running.
fn wait_until_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `timeout` for `child` (any process a test runs) to exit; kills it at the deadline and
/// returns `None` then.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let status = wait_until_exit(child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// Whether a TOML fragment sets `key` at the start of a line.
fn sets_key(toml: &str, key: &str) -> bool {
    toml.lines().any(|line| {
        line.trim_start()
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    })
}

/// Spawns `command` and waits for its `listening on` line; returns the child, the public base URL and
/// the admin URL (from the `admin listening on ADDR` line the binary prints before, when it has one).
fn spawn(mut command: Command) -> (Child, String, Option<String>) {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn fhir-bulk-proxy");
    let stdout = child.stdout.take().unwrap();
    // Read on a thread so that a proxy that hangs silently still hits the deadline; the thread keeps
    // draining stdout afterwards so the child never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut admin = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("admin listening on ") {
                admin = Some(format!("http://{}", addr.trim()));
            } else if let Some(rest) = line.strip_prefix("listening on ") {
                // `listening on 127.0.0.1:PORT, public base http://127.0.0.1:PORT/fhir`
                let base = rest
                    .split("public base ")
                    .nth(1)
                    .map(|b| b.trim().to_owned());
                let _ = tx.send((base, admin.take()));
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok((Some(base), admin)) => (child, base, admin),
        failure => {
            let _ = child.kill();
            let status = child.wait();
            match failure {
                Ok(_) => panic!("malformed listening line (no public base)"),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("proxy did not start listening within 30 s")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("proxy exited before listening: {status:?}")
                }
            }
        }
    }
}
