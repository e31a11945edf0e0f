//! `exec`.

use anyhow::{bail, Result};
use migrun_runtime::lifecycle::{self, ExecOptions};
use migrun_runtime::{foreground, StateRoot};

use crate::cli::ExecArgs;

/// Splits `uid[:gid]`.
fn parse_user(text: &str) -> Result<(u32, Option<u32>)> {
    let (uid, gid) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    let uid = uid
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid user {text:?}: expected uid[:gid]"))?;
    let gid = match gid {
        Some(g) => Some(
            g.parse()
                .map_err(|_| anyhow::anyhow!("invalid user {text:?}: expected uid[:gid]"))?,
        ),
        None => None,
    };
    Ok((uid, gid))
}

/// `migrun exec [flags] ID COMMAND...`: returns the process's exit status
/// unless detached.
pub fn exec(root: &StateRoot, args: &ExecArgs) -> Result<i32> {
    if args.command.is_empty() && args.process.is_none() {
        bail!("exec needs a command or --process");
    }
    let (uid, gid) = match &args.user {
        Some(u) => {
            let (uid, gid) = parse_user(u)?;
            (Some(uid), gid)
        }
        None => (None, None),
    };
    let opts = ExecOptions {
        id: args.id.clone(),
        args: args.command.clone(),
        process: args.process.clone(),
        env: args.env.clone(),
        cwd: args.cwd.clone(),
        uid,
        gid,
        additional_gids: args.additional_gids.clone(),
        caps: args.cap.clone(),
        no_new_privs: args.no_new_privs,
        tty: args.tty,
        console_socket: args.console_socket.clone(),
        pid_file: args.pid_file.clone(),
        preserve_fds: args.preserve_fds,
        detach: args.detach,
    };
    let pid = lifecycle::exec(root, &opts)?;
    if args.detach {
        return Ok(0);
    }
    let signals = foreground::block_signals()?;
    Ok(foreground::wait_forwarding(pid, &signals)?)
}

#[cfg(test)]
mod tests {
    use super::parse_user;

    #[test]
    fn users() {
        assert_eq!(parse_user("1000").ok(), Some((1000, None)));
        assert_eq!(parse_user("1000:50").ok(), Some((1000, Some(50))));
        assert!(parse_user("bob").is_err());
    }
}
