//! Command line of fhir-bulk-proxy.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use fhir_bulk_proxy::config::{Config, Overrides};
use url::Url;

/// FHIR Bulk Data export proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format: JSON lines (the container default), human-readable, or pretty when stderr is a terminal.
    #[arg(long, global = true, env = "FBP_LOG_FORMAT", default_value = "auto")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Auto,
    Json,
    Pretty,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
    /// See and cancel export jobs of a running proxy, through its admin listener.
    Jobs {
        /// Base URL of the admin listener (`admin.listen`).
        #[arg(long, env = "FBP_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
        admin: Url,
        #[command(subcommand)]
        action: JobsAction,
    },
}

#[derive(Subcommand)]
enum JobsAction {
    /// One line per job: id, state, progress, owner.
    List,
    /// A job with its slices, as JSON.
    Show { id: String },
    /// Cancel a job and remove its files.
    Cancel { id: String },
}

/// Flags win over environment variables, which win over the config file.
#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file; without one, every setting but the upstream URL has its default.
    #[arg(long, short, env = "FBP_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args, cli.log_format),
        Command::Jobs { admin, action } => jobs(admin, action),
    }
}

/// Tunes glibc's malloc for a long-running export, unless the operator set the same knobs through
/// `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_`.
///
/// - Two arenas, not eight per core: export pages are allocated on tokio's workers and freed on
///   blocking threads, so each arena came to keep freed page-sized blocks resident, and the longer an
///   export ran the more arenas it had touched.
/// - A fixed 256 KiB mmap threshold: glibc otherwise raises the threshold to the size of the last large
///   block freed, after which megabyte-sized buffers (hyper's read buffers, Bundles without
///   Content-Length) come from the arenas and fragment them; mapped blocks go back to the system when
///   freed. Page buffers are pooled (`Upstream`, the slice writer), so this costs no mapping per page.
///
/// `bench/run` measures what this is for: peak RSS flat from 100k to 1M resources.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (variable, parameter, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 256 * 1024),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mallopt only sets an allocator parameter; it runs before any thread starts.
            unsafe {
                libc::mallopt(parameter, value);
            }
        }
    }
}

/// Lowers the calling thread's scheduling priority to `nice` (`server.background_nice`): the main
/// runtime's threads run the export jobs, whose page conversion and file writes would otherwise take
/// the CPU from the serving threads that carry clinical pass-through traffic (those keep the default
/// priority). A machine with CPU to spare gives the jobs all they can use either way.
fn yield_to_serving(nice: u8) {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only changes the scheduling weight of the calling thread (who 0 is itself
    // on Linux, where the nice value is per thread).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, libc::c_int::from(nice));
    }
}

fn serve(args: ServeArgs, log_format: LogFormat) -> ExitCode {
    tune_malloc();
    let overrides = args.overrides;
    let config = match Config::load(args.config.as_deref(), overrides.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fhir-bulk-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let json = match log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let telemetry = match fhir_bulk_proxy::telemetry::init(json, &config.telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("fhir-bulk-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let nice = config.server.background_nice;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || yield_to_serving(nice))
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(fhir_bulk_proxy::server::run(config, args.config, overrides));
    drop(runtime);
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "fhir-bulk-proxy stopped");
            eprintln!("fhir-bulk-proxy: {e}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

fn jobs(admin: Url, action: JobsAction) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(jobs_request(admin, action)) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fhir-bulk-proxy jobs: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn jobs_request(admin: Url, action: JobsAction) -> Result<String, String> {
    let client = reqwest::Client::new();
    let url = |path: &str| admin.join(path).map_err(|e| e.to_string());
    let request = match &action {
        JobsAction::List => client.get(url("jobs")?),
        JobsAction::Show { id } => client.get(url(&format!("jobs/{id}"))?),
        JobsAction::Cancel { id } => client.delete(url(&format!("jobs/{id}"))?),
    };
    let response = request.send().await.map_err(|e| format!("{admin}: {e}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        let detail = body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        return Err(format!("{status}: {detail}"));
    }
    Ok(match action {
        JobsAction::List => {
            let jobs = body.as_array().cloned().unwrap_or_default();
            let mut lines = vec![format!(
                "{:<32}  {:<9}  {:<12}  PROGRESS",
                "ID", "STATE", "OWNER"
            )];
            for j in jobs {
                lines.push(format!(
                    "{:<32}  {:<9}  {:<12}  {}",
                    j["id"].as_str().unwrap_or(""),
                    j["state"].as_str().unwrap_or(""),
                    j["owner"].as_str().unwrap_or("-"),
                    j["progress"].as_str().unwrap_or(""),
                ));
            }
            lines.join("\n")
        }
        _ => serde_json::to_string_pretty(&body).map_err(|e| e.to_string())?,
    })
}
