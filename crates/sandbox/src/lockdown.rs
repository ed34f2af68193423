//! How the decoder process shuts itself in, in this order, before it reads a byte of video:
//!
//! 1. **Resource limits**: address space [`ADDRESS_SPACE`] (1 GiB: a 4K stream needs ≈100 MB),
//!    no core files; the process dies with the console (parent-death signal).
//! 2. **`no_new_privs`**: nothing it could execute would gain privileges (and seccomp and
//!    landlock require it).
//! 3. **Landlock** (best effort, ABI 6 asked for): every filesystem access right handled and none
//!    granted, TCP bind and connect handled and none granted, signals and abstract Unix sockets
//!    scoped to itself. On a kernel without landlock the process logs a warning and goes on:
//!    seccomp below already refuses opening anything.
//! 4. **Seccomp** ([`allowed_syscalls`]): an allow-list; everything else kills the process, except
//!    opening files and sockets and looking at paths, which fail with `EPERM` (so a library that
//!    tries them on an error path fails gracefully instead of taking the picture down).

use crate::protocol::Landlock;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;

/// The decoder process's address-space limit.
pub const ADDRESS_SPACE: u64 = 1 << 30;

/// The descriptors of the decoder process.
pub const FD_CHANNEL: i32 = 0;
pub const FD_PICTURE: i32 = 1;
pub const FD_LOG: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum LockdownError {
    #[error("cannot limit the address space: {0}")]
    Rlimit(std::io::Error),
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    #[error("cannot build the seccomp filter: {0}")]
    Filter(String),
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
}

/// What the lockdown achieved (seccomp and `no_new_privs` always, or it fails).
#[derive(Debug)]
pub struct Locked {
    pub landlock: Landlock,
    /// Why landlock is missing or partial, to log.
    pub landlock_note: Option<String>,
}

/// Steps 1 and 2: limits and `no_new_privs`.
pub fn limit_resources() -> Result<(), LockdownError> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let cap = |n| Rlimit {
        current: Some(n),
        maximum: Some(n),
    };
    setrlimit(Resource::As, cap(ADDRESS_SPACE)).map_err(|e| LockdownError::Rlimit(e.into()))?;
    setrlimit(Resource::Core, cap(0)).map_err(|e| LockdownError::Rlimit(e.into()))?;
    // A decoder whose console died must not live on (e.g. spinning in a hostile stream).
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| LockdownError::Rlimit(e.into()))?;
    rustix::thread::set_no_new_privs(true).map_err(|e| LockdownError::NoNewPrivs(e.into()))?;
    Ok(())
}

/// Step 3: landlock, best effort.
pub fn landlock() -> (Landlock, Option<String>) {
    use landlock::{ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetStatus, Scope};
    let abi = ABI::V6;
    let r = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self());
    match r {
        Ok(s) => match s.ruleset {
            RulesetStatus::FullyEnforced => (Landlock::Fully, None),
            RulesetStatus::PartiallyEnforced => (
                Landlock::Partly,
                Some(format!(
                    "landlock is only partly enforced by this kernel ({:?})",
                    s.landlock
                )),
            ),
            RulesetStatus::NotEnforced => (
                Landlock::NotEnforced,
                Some(format!(
                    "this kernel does not enforce landlock ({:?}); seccomp still applies",
                    s.landlock
                )),
            ),
        },
        Err(e) => (
            Landlock::NotEnforced,
            Some(format!("landlock failed: {e}; seccomp still applies")),
        ),
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, LockdownError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| LockdownError::Filter(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, LockdownError> {
    SeccompRule::new(conds).map_err(|e| LockdownError::Filter(e.to_string()))
}

/// The first argument is one of `fds`.
fn on_fds(fds: &[i32]) -> Result<Vec<SeccompRule>, LockdownError> {
    fds.iter()
        .map(|&fd| rule(vec![cond(0, SeccompCmpOp::Eq, fd as u64)?]))
        .collect()
}

/// Memory protection `arg` never asks for executable pages.
fn not_exec(arg: u8) -> Result<SeccompCondition, LockdownError> {
    cond(arg, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)
}

/// `mmap` of anonymous memory only (no file, not even its own descriptors), never executable.
fn anonymous_mmap() -> Result<Vec<SeccompRule>, LockdownError> {
    let anon = libc::MAP_ANONYMOUS as u64;
    Ok(vec![rule(vec![
        not_exec(2)?,
        cond(3, SeccompCmpOp::MaskedEq(anon), anon)?,
    ])?])
}

/// The system calls the decode loop makes (an empty rule list: any arguments).
pub fn allowed_syscalls(pid: i32) -> Result<BTreeMap<i64, Vec<SeccompRule>>, LockdownError> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // Its three descriptors: requests in and answers out, the picture, log lines.
    m.insert(libc::SYS_read, on_fds(&[FD_CHANNEL])?);
    m.insert(libc::SYS_write, on_fds(&[FD_CHANNEL, FD_LOG])?);
    m.insert(libc::SYS_pwrite64, on_fds(&[FD_PICTURE])?);
    // Memory: anonymous, never executable.
    m.insert(libc::SYS_mmap, anonymous_mmap()?);
    m.insert(libc::SYS_mprotect, vec![rule(vec![not_exec(2)?])?]);
    for s in [
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_madvise,
    ] {
        m.insert(s, vec![]);
    }
    // Locks, time, leaving, signals returning, an abort reaching itself.
    for s in [
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_close,
    ] {
        m.insert(s, vec![]);
    }
    m.insert(libc::SYS_tgkill, on_fds(&[pid])?);
    Ok(m)
}

/// System calls refused with `EPERM` instead of a kill: opening and looking up paths, sockets.
pub fn refused_syscalls() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_readlinkat,
        libc::SYS_socket,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_open,
        libc::SYS_creat,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_access,
        libc::SYS_readlink,
    ]);
    v
}

/// The two filters: the allow-list (default: kill the process), and `EPERM` for
/// [`refused_syscalls`]. The kernel runs both and the stricter answer wins.
pub fn filters(pid: i32) -> Result<[BpfProgram; 2], LockdownError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| LockdownError::Filter(e.to_string()))?;
    let mut allow = allowed_syscalls(pid)?;
    let refused = refused_syscalls();
    for s in &refused {
        allow.insert(*s, vec![]);
    }
    let allow = SeccompFilter::new(
        allow,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| LockdownError::Filter(e.to_string()))?;
    let eperm = SeccompFilter::new(
        refused.into_iter().map(|s| (s, vec![])).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| LockdownError::Filter(e.to_string()))?;
    let a: BpfProgram = allow
        .try_into()
        .map_err(|e: seccompiler::BackendError| LockdownError::Filter(e.to_string()))?;
    let b: BpfProgram = eperm
        .try_into()
        .map_err(|e: seccompiler::BackendError| LockdownError::Filter(e.to_string()))?;
    Ok([a, b])
}

/// Step 4: installs the filters (for every thread of the process): the `EPERM` one first, since
/// once the allow-list is in, installing a filter is no longer allowed.
pub fn seccomp(filters: &[BpfProgram; 2]) -> Result<(), LockdownError> {
    for f in filters.iter().rev() {
        seccompiler::apply_filter_all_threads(f)
            .map_err(|e| LockdownError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

/// All four steps.
pub fn lock_down() -> Result<Locked, LockdownError> {
    // Built before anything is restricted (building allocates, which stays allowed anyway).
    let filters = filters(rustix::process::getpid().as_raw_nonzero().get())?;
    limit_resources()?;
    let (landlock, landlock_note) = landlock();
    seccomp(&filters)?;
    Ok(Locked {
        landlock,
        landlock_note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_and_the_lists_do_not_overlap() {
        let [a, b] = filters(1234).unwrap();
        assert!(!a.is_empty() && !b.is_empty());
        let allowed = allowed_syscalls(1234).unwrap();
        for s in refused_syscalls() {
            assert!(!allowed.contains_key(&s), "{s} both allowed and refused");
        }
        for s in [
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_ptrace,
            libc::SYS_connect,
        ] {
            assert!(!allowed.contains_key(&s));
        }
    }
}
