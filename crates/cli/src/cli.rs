//! runc's command line, parsed with clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Version text printed by `--version`, in runc's layout.
pub const VERSION_TEXT: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nspec: 1.2.0\nlibcontainer: 0.7.0"
);

/// migrun: a runc-compatible OCI runtime with live migration.
#[derive(Parser, Debug)]
#[command(name = "migrun", version = VERSION_TEXT, about, propagate_version = false)]
pub struct Cli {
    /// Options that apply to every command.
    #[command(flatten)]
    pub global: GlobalOpts,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `time="..." level=... msg="..."` lines (logrus text).
    #[default]
    Text,
    /// One JSON object per line with level, msg and time (logrus JSON).
    Json,
}

/// Whether to run in rootless mode.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum Rootless {
    /// Decide from the effective user.
    #[default]
    Auto,
    /// Force rootless mode.
    True,
    /// Never rootless.
    False,
}

/// Global options, as runc has them.
#[derive(Args, Debug, Clone)]
pub struct GlobalOpts {
    /// Root directory for storage of container state
    #[arg(long, default_value = "/run/migrun")]
    pub root: PathBuf,
    /// Set the log file to write logs to (default: standard error)
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Set the log format
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Enable debug logging
    #[arg(long)]
    pub debug: bool,
    /// Enable systemd cgroup support
    #[arg(long)]
    pub systemd_cgroup: bool,
    /// Path to the criu binary used for checkpoint and restore
    #[arg(long, default_value = "criu")]
    pub criu: PathBuf,
    /// Ignore cgroup permission errors
    #[arg(long, value_enum, default_value_t = Rootless::Auto)]
    pub rootless: Rootless,
}

/// Flags shared by `create` and `run`.
#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    /// Path to the root of the bundle directory
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Path to an AF_UNIX socket which will receive the pty master (a
    /// relative path is in the bundle directory, as with runc)
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Specify the file to write the process id to
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Do not use pivot root to jail the process inside rootfs
    #[arg(long)]
    pub no_pivot: bool,
    /// Do not create a new session keyring for the container
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Pass N additional file descriptors to the container (stdio + $LISTEN_FDS + N in total)
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: i32,
    /// The container id
    pub id: String,
}

/// Output formats of `list` and `ps`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum TableOrJson {
    /// Aligned columns.
    #[default]
    Table,
    /// JSON.
    Json,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new specification file (config.json)
    Spec {
        /// Path to the root of the bundle directory
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        /// Generate a configuration for a rootless container
        #[arg(long)]
        rootless: bool,
    },
    /// Create a container
    Create(CreateArgs),
    /// Execute the user defined process in a created container
    Start {
        /// The container id
        id: String,
    },
    /// Create and run a container
    Run {
        /// Detach from the container's process
        #[arg(short, long)]
        detach: bool,
        /// Flags shared with create.
        #[command(flatten)]
        create: CreateArgs,
    },
    /// Output the state of a container
    State {
        /// The container id
        id: String,
    },
    /// List containers started by migrun with the given root
    #[command(alias = "ls")]
    List {
        /// Select one of: table or json
        #[arg(short, long, value_enum, default_value_t = TableOrJson::Table)]
        format: TableOrJson,
        /// Display only container ids
        #[arg(short, long)]
        quiet: bool,
    },
    /// Send the specified signal (default: SIGTERM) to the container's init process
    Kill {
        /// Send the signal to all processes in the container
        #[arg(short, long)]
        all: bool,
        /// The container id
        id: String,
        /// Signal name (with or without SIG) or number
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete any resources held by the container
    #[command(alias = "rm")]
    Delete {
        /// Forcibly delete the container if it is still running (uses SIGKILL)
        #[arg(short, long)]
        force: bool,
        /// The container ids
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Execute new process inside the container
    Exec(ExecArgs),
    /// Display the processes running inside a container
    Ps {
        /// Select one of: table or json
        #[arg(short, long, value_enum, default_value_t = TableOrJson::Table)]
        format: TableOrJson,
        /// The container id
        id: String,
        /// Options passed to ps (default -ef)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// Suspend all processes inside the container
    Pause {
        /// The container id
        id: String,
    },
    /// Resume all processes that have been previously paused
    Resume {
        /// The container id
        id: String,
    },
    /// Display container events such as OOM notifications, CPU, memory and IO usage statistics
    Events {
        /// Display the container's stats then exit
        #[arg(long)]
        stats: bool,
        /// Set the stats collection interval
        #[arg(long, default_value = "5s")]
        interval: String,
        /// The container id
        id: String,
    },
    /// Update container resource constraints
    Update(UpdateArgs),
    /// Show the enabled features
    Features,
    /// Checkpoint a running container
    Checkpoint(CheckpointArgs),
    /// Restore a container from a previous checkpoint
    Restore(RestoreArgs),
    /// Write a fresh shared secret for a pair of migration hosts
    Keygen {
        /// Where to write the key (mode 0600; never overwritten)
        #[arg(long)]
        out: PathBuf,
    },
    /// Receive live-migrated containers (the target side)
    MigrateIn {
        /// ADDR:PORT to listen on
        #[arg(long)]
        listen: String,
        /// Shared key file (from `migrun keygen`)
        #[arg(long)]
        key: PathBuf,
        /// Exit after one migration, with its status
        #[arg(long)]
        once: bool,
        /// Where incoming bundles and images go
        #[arg(long, default_value = "/run/migrun-in")]
        work_dir: PathBuf,
        /// Let CRIU copy all memory into the restored processes inside the
        /// downtime, instead of restoring without it and filling it in from
        /// the received pages while the container runs (lazy pages)
        #[arg(long)]
        no_lazy_restore: bool,
        /// Bridge of this host that a restored container's veths are
        /// attached to; its addresses are then announced (gratuitous ARP)
        #[arg(long)]
        bridge: Option<String>,
        /// Rebuild incoming Docker containers in this Docker daemon
        /// (unix:///PATH.sock) and restore them through it
        #[arg(long)]
        docker_host: Option<String>,
        /// Seconds of silence from a source that has started before it
        /// counts as lost
        #[arg(long, default_value_t = 10.0)]
        peer_timeout: f64,
        /// Tests only: ACTION@STEP (crash, drop, stall, hold; a journal step)
        #[arg(long, hide = true)]
        inject_fault: Option<String>,
    },
    /// Live-migrate a running container to a target host (the source side)
    MigrateOut {
        /// The container id
        id: String,
        /// HOST:PORT of the target's migrate-in
        #[arg(long)]
        to: String,
        /// Shared key file (from `migrun keygen`)
        #[arg(long)]
        key: PathBuf,
        /// Most pre-copy rounds
        #[arg(long, default_value_t = 10)]
        max_rounds: u32,
        /// Downtime to aim for, in milliseconds
        #[arg(long, default_value_t = 300)]
        max_downtime: u64,
        /// Cap on what migrun sends, in Mbit/s
        #[arg(long)]
        bandwidth: Option<u64>,
        /// Stop-and-copy: freeze, dump, send everything, restore
        #[arg(long)]
        no_precopy: bool,
        /// Write the migration's figures as JSON to this file
        #[arg(long)]
        stats_json: Option<PathBuf>,
        /// Where CRIU's images of the frozen state go
        #[arg(long, default_value = "/run/migrun-out")]
        work_dir: PathBuf,
        /// ID is a container of this Docker daemon (unix:///PATH.sock), by
        /// name or id; it is removed from there after the migration
        #[arg(long)]
        docker_host: Option<String>,
        /// Seconds of silence from the target (or of it taking nothing we
        /// send) before it counts as lost
        #[arg(long, default_value_t = 10.0)]
        peer_timeout: f64,
        /// Tests only: ACTION@STEP (crash, drop, stall, hold; a journal step)
        #[arg(long, hide = true)]
        inject_fault: Option<String>,
    },
    /// Settle a migration whose hand-over was cut (run on each host)
    MigrateRecover {
        /// The container id (as the source names it)
        id: String,
        /// HOST:PORT of the peer's migrate-in or `migrate-recover --listen`
        #[arg(long, conflicts_with = "listen")]
        peer: Option<String>,
        /// ADDR:PORT to wait on for the peer's `migrate-recover --peer`
        #[arg(long)]
        listen: Option<String>,
        /// Shared key file (with --peer or --listen)
        #[arg(long)]
        key: Option<PathBuf>,
        /// The side whose copy wins when the peer is gone for good
        #[arg(long, value_parser = ["source", "target"])]
        winner: Option<String>,
        /// Seconds to wait for the peer
        #[arg(long, default_value_t = 10.0)]
        peer_timeout: f64,
        /// Docker mode: ID is a container of the daemon at this address
        /// (unix:///PATH), on either side
        #[arg(long)]
        docker_host: Option<String>,
    },
}

/// Flags shared by `checkpoint` and `restore` (runc's names).
#[derive(Args, Debug, Clone)]
pub struct CriuArgs {
    /// Path for saving criu image files
    #[arg(long, default_value = "checkpoint")]
    pub image_path: PathBuf,
    /// Path for saving work files and logs
    #[arg(long)]
    pub work_path: Option<PathBuf>,
    /// Allow open tcp connections
    #[arg(long)]
    pub tcp_established: bool,
    /// Allow external unix sockets
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Allow shell jobs
    #[arg(long)]
    pub shell_job: bool,
    /// Handle file locks, for safety
    #[arg(long)]
    pub file_locks: bool,
    /// Use lazy migration mechanism
    #[arg(long)]
    pub lazy_pages: bool,
    /// cgroups mode: soft, full, strict or ignore
    #[arg(long)]
    pub manage_cgroups_mode: Option<String>,
    /// Create a namespace, but don't restore its properties (only "network")
    #[arg(long)]
    pub empty_ns: Vec<String>,
    /// Enable auto deduplication of memory images
    #[arg(long)]
    pub auto_dedup: bool,
}

/// Flags of `checkpoint`.
#[derive(Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Flags shared with restore.
    #[command(flatten)]
    pub criu: CriuArgs,
    /// Path for previous criu image files in pre-dump
    #[arg(long)]
    pub parent_path: Option<String>,
    /// Leave the process running after checkpointing
    #[arg(long)]
    pub leave_running: bool,
    /// Dump container's memory information only, leave the container running after this
    #[arg(long)]
    pub pre_dump: bool,
    /// ADDRESS:PORT of the page server
    #[arg(long)]
    pub page_server: Option<String>,
    /// criu writes \0 to this FD once lazy-pages is ready
    #[arg(long)]
    pub status_fd: Option<i32>,
    /// The container id
    pub id: String,
}

/// Flags of `restore`.
#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    /// Flags shared with checkpoint.
    #[command(flatten)]
    pub criu: CriuArgs,
    /// Path to the root of the bundle directory
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Detach from the container's process
    #[arg(short, long)]
    pub detach: bool,
    /// Specify the file to write the process id to
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Path to an AF_UNIX socket which will receive the pty master
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Do not use pivot root to jail the process inside rootfs
    #[arg(long)]
    pub no_pivot: bool,
    /// Disable the use of the subreaper used to reap reparented processes
    #[arg(long)]
    pub no_subreaper: bool,
    /// (migrun) Plug the outside ends of the container's restored veths
    /// into this bridge of the caller's network namespace, up, before the
    /// restored processes send a packet
    #[arg(long, value_name = "NAME")]
    pub bridge: Option<String>,
    /// The container id
    pub id: String,
}

/// Flags of `exec`.
#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// Path to an AF_UNIX socket which will receive the pty master
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Current working directory in the container
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Set environment variables (KEY=VALUE)
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Allocate a pseudo-TTY
    #[arg(short, long)]
    pub tty: bool,
    /// UID (format: <uid>[:<gid>])
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional gids
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// Path to the process.json
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Detach from the container's process
    #[arg(short, long)]
    pub detach: bool,
    /// Specify the file to write the process id to
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Set the asm process label for the process (accepted, not used)
    #[arg(long)]
    pub process_label: Option<String>,
    /// Set the apparmor profile for the process (accepted, not used)
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Set the no new privileges value for the process
    #[arg(long)]
    pub no_new_privs: bool,
    /// Add a capability to the bounding set for the process
    #[arg(short, long)]
    pub cap: Vec<String>,
    /// Pass N additional file descriptors to the process
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: i32,
    /// Allow exec in a paused container (accepted for compatibility)
    #[arg(long)]
    pub ignore_paused: bool,
    /// The container id
    pub id: String,
    /// The command and its arguments
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Flags of `update`.
#[derive(Args, Debug, Clone)]
pub struct UpdateArgs {
    /// Path to a file containing the resources to update, or "-" to read from standard input
    #[arg(short, long)]
    pub resources: Option<PathBuf>,
    /// Memory limit (in bytes, or with a k/m/g suffix)
    #[arg(long)]
    pub memory: Option<String>,
    /// Total memory usage (memory + swap); set "-1" to enable unlimited swap
    #[arg(long)]
    pub memory_swap: Option<String>,
    /// Memory reservation or soft limit
    #[arg(long)]
    pub memory_reservation: Option<String>,
    /// Kernel memory limit (ignored, as in runc)
    #[arg(long)]
    pub kernel_memory: Option<String>,
    /// CPU CFS hardcap limit (in usecs)
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    /// CPU CFS period to be used for hardcapping (in usecs)
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// CPU shares (relative weight vs. other containers)
    #[arg(long = "cpu-share", alias = "cpu-shares")]
    pub cpu_shares: Option<u64>,
    /// CPU(s) to use
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    /// Memory node(s) to use
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    /// Maximum number of pids allowed in the container
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Specifies per cgroup weight (accepted, not applied on this host)
    #[arg(long)]
    pub blkio_weight: Option<u16>,
    /// The container id
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).expect("parse")
    }

    #[test]
    fn containerd_create_line() {
        let cli = parse(&[
            "migrun",
            "--root",
            "/run/x",
            "--log",
            "/tmp/log.json",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "--console-socket",
            "/s",
            "abc",
        ]);
        assert_eq!(cli.global.root, PathBuf::from("/run/x"));
        assert_eq!(cli.global.log_format, LogFormat::Json);
        match cli.command {
            Command::Create(c) => {
                assert_eq!(c.id, "abc");
                assert_eq!(c.bundle, PathBuf::from("/b"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exec_keeps_command_flags() {
        let cli = parse(&["migrun", "exec", "-e", "A=1", "c1", "ls", "-la"]);
        match cli.command {
            Command::Exec(e) => {
                assert_eq!(e.id, "c1");
                assert_eq!(e.command, vec!["ls", "-la"]);
                assert_eq!(e.env, vec!["A=1"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ps_takes_ps_options() {
        let cli = parse(&["migrun", "ps", "c1", "-o", "pid,comm"]);
        match cli.command {
            Command::Ps { id, ps_args, .. } => {
                assert_eq!(id, "c1");
                assert_eq!(ps_args, vec!["-o", "pid,comm"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kill_defaults_to_term() {
        match parse(&["migrun", "kill", "c1"]).command {
            Command::Kill { signal, all, .. } => {
                assert_eq!(signal, "SIGTERM");
                assert!(!all);
            }
            other => panic!("{other:?}"),
        }
    }
}
