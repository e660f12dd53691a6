//! The sandboxes' seccomp filter, compiled once per backend with `seccompiler` and handed to
//! bubblewrap (`--seccomp FD`), which installs it right before it executes the command (so its
//! own setup, which mounts and unshares, is not affected).
//!
//! Default allow; denied with `EPERM` are the system calls a sandboxed program never needs and
//! that widen the kernel's attack surface or reach outside the sandbox: mounting (`mount`,
//! `umount2`, `pivot_root`, `chroot`, the new mount API `open_tree`, `move_mount`, `fsopen`,
//! `fsconfig`, `fsmount`, `fspick`, `mount_setattr`), namespaces (`setns`, `unshare`, and `clone`
//! with any `CLONE_NEW*` flag), kernel modules and kexec, `bpf`, `perf_event_open`, tracing
//! other processes (`ptrace`, `process_vm_readv`/`writev`), the kernel keyring, `userfaultfd`,
//! file handles (`open_by_handle_at`, `name_to_handle_at`), `reboot`, swap, `acct`, setting the
//! clocks, `syslog`, port I/O (`iopl`, `ioperm`), `lookup_dcookie`, quotas, `io_uring`,
//! `vhangup`, `sethostname`/`setdomainname`, `fanotify_init`, `nfsservctl` and `uselib`;
//! `personality` is allowed only to query or to set the plain Linux personalities (like
//! Docker's default profile: no `READ_IMPLIES_EXEC`, no `ADDR_NO_RANDOMIZE`).
//!
//! `clone3` fails with `ENOSYS`: its flags are behind a pointer a filter cannot read, and C
//! libraries fall back to `clone` on `ENOSYS`, whose flags are checked. On x86_64, system calls
//! of the x32 ABI (numbers with bit 30 set, which carry the same architecture tag and would slip
//! past a list of x86_64 numbers) fail with `ENOSYS` too.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::BackendError;

/// A compiled filter: the raw `struct sock_filter` array bubblewrap reads from its fd.
#[derive(Clone, Debug)]
pub struct SeccompProgram {
    instructions: Vec<sock_filter>,
}

impl SeccompProgram {
    /// The bytes of the program, as `--seccomp FD` expects them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.instructions.len() * 8);
        for i in &self.instructions {
            out.extend_from_slice(&i.code.to_ne_bytes());
            out.push(i.jt);
            out.push(i.jf);
            out.extend_from_slice(&i.k.to_ne_bytes());
        }
        out
    }

    pub fn len(&self) -> usize {
        self.instructions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instructions.is_empty()
    }
}

/// The system calls denied with `EPERM` outright, by name and number.
pub fn denied_syscalls() -> Vec<(&'static str, i64)> {
    #[allow(unused_mut)]
    let mut list: Vec<(&'static str, libc::c_long)> = vec![
        ("mount", libc::SYS_mount),
        ("umount2", libc::SYS_umount2),
        ("pivot_root", libc::SYS_pivot_root),
        ("chroot", libc::SYS_chroot),
        ("open_tree", libc::SYS_open_tree),
        ("move_mount", libc::SYS_move_mount),
        ("fsopen", libc::SYS_fsopen),
        ("fsconfig", libc::SYS_fsconfig),
        ("fsmount", libc::SYS_fsmount),
        ("fspick", libc::SYS_fspick),
        ("mount_setattr", libc::SYS_mount_setattr),
        ("setns", libc::SYS_setns),
        ("unshare", libc::SYS_unshare),
        ("kexec_load", libc::SYS_kexec_load),
        ("kexec_file_load", libc::SYS_kexec_file_load),
        ("init_module", libc::SYS_init_module),
        ("finit_module", libc::SYS_finit_module),
        ("delete_module", libc::SYS_delete_module),
        ("bpf", libc::SYS_bpf),
        ("perf_event_open", libc::SYS_perf_event_open),
        ("ptrace", libc::SYS_ptrace),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("process_vm_writev", libc::SYS_process_vm_writev),
        ("keyctl", libc::SYS_keyctl),
        ("add_key", libc::SYS_add_key),
        ("request_key", libc::SYS_request_key),
        ("userfaultfd", libc::SYS_userfaultfd),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("name_to_handle_at", libc::SYS_name_to_handle_at),
        ("reboot", libc::SYS_reboot),
        ("swapon", libc::SYS_swapon),
        ("swapoff", libc::SYS_swapoff),
        ("acct", libc::SYS_acct),
        ("settimeofday", libc::SYS_settimeofday),
        ("clock_settime", libc::SYS_clock_settime),
        ("clock_adjtime", libc::SYS_clock_adjtime),
        ("adjtimex", libc::SYS_adjtimex),
        ("syslog", libc::SYS_syslog),
        ("lookup_dcookie", libc::SYS_lookup_dcookie),
        ("quotactl", libc::SYS_quotactl),
        ("quotactl_fd", libc::SYS_quotactl_fd),
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("io_uring_enter", libc::SYS_io_uring_enter),
        ("io_uring_register", libc::SYS_io_uring_register),
        ("vhangup", libc::SYS_vhangup),
        ("sethostname", libc::SYS_sethostname),
        ("setdomainname", libc::SYS_setdomainname),
        ("fanotify_init", libc::SYS_fanotify_init),
        ("nfsservctl", libc::SYS_nfsservctl),
    ];
    #[cfg(target_arch = "x86_64")]
    list.extend([
        ("iopl", libc::SYS_iopl),
        ("ioperm", libc::SYS_ioperm),
        ("uselib", libc::SYS_uselib),
    ]);
    #[allow(clippy::unnecessary_cast)] // c_long is i64 on both targets
    list.into_iter().map(|(n, v)| (n, v as i64)).collect()
}

/// `CLONE_NEW*` flags that `clone` may not carry (`CLONE_NEWTIME` is only valid for `unshare`
/// and `clone3`, both refused anyway, and shares its bit with the exit signal in `clone`).
const CLONE_NAMESPACE_FLAGS: [i32; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

#[cfg(target_arch = "x86_64")]
fn target_arch() -> TargetArch {
    TargetArch::x86_64
}

#[cfg(target_arch = "aarch64")]
fn target_arch() -> TargetArch {
    TargetArch::aarch64
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the sandbox seccomp filter is written for x86_64 and aarch64");

/// BPF_LD | BPF_W | BPF_ABS
const BPF_LD_W_ABS: u16 = 0x20;
/// BPF_JMP | BPF_JEQ | BPF_K
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
#[cfg(target_arch = "x86_64")]
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_DATA_NR_OFFSET: u32 = 0;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Compiles the filter for the architecture this binary was built for.
pub fn compile() -> Result<SeccompProgram, BackendError> {
    fn fail(e: impl std::fmt::Display) -> BackendError {
        BackendError::Setup(format!("seccomp filter: {e}"))
    }
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, nr) in denied_syscalls() {
        // An empty chain matches the call whatever its arguments.
        rules.insert(nr, Vec::new());
    }
    let clone_rules = CLONE_NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(flag as u64),
                flag as u64,
            )
            .map_err(fail)?])
            .map_err(fail)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    // vsock is not network-namespaced: on a VM host (or the Kata node pool the manifests
    // suggest) it reaches the host's agents past the egress proxy and nft rules alike.
    for nr in [libc::SYS_socket, libc::SYS_socketpair] {
        let vsock = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_VSOCK as u64,
        )
        .map_err(fail)?;
        rules.insert(nr, vec![SeccompRule::new(vec![vsock]).map_err(fail)?]);
    }
    // personality(p) is refused unless p is one of these (conditions of a rule are ANDed).
    let personality_ok: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];
    let conditions = personality_ok
        .iter()
        .map(|&p| SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail)?;
    rules.insert(
        libc::SYS_personality,
        vec![SeccompRule::new(conditions).map_err(fail)?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target_arch(),
    )
    .map_err(fail)?;
    let mut program: BpfProgram = filter.try_into().map_err(fail)?;

    // seccompiler's program starts with a 3-instruction architecture check whose success jumps
    // to the 4th instruction; our prefix goes there (BPF jumps are relative and forward only,
    // so the rest of the program is unaffected).
    let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    #[allow(unused_mut)]
    let mut prefix = vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR_OFFSET),
        jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(BPF_RET_K, enosys),
    ];
    #[cfg(target_arch = "x86_64")]
    prefix.extend([
        jump(BPF_JMP_JGE_K, 0x4000_0000, 0, 1),
        stmt(BPF_RET_K, enosys),
    ]);
    if program.len() < 3 || program[0].code != BPF_LD_W_ABS || program[2].code != BPF_RET_K {
        return Err(BackendError::Setup(
            "seccomp filter: unexpected program layout from seccompiler".into(),
        ));
    }
    program.splice(3..3, prefix);
    Ok(SeccompProgram {
        instructions: program,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUDIT_ARCH_OFFSET: u32 = 4;

    /// Runs a classic BPF program over a `seccomp_data` (the subset seccompiler emits).
    fn run(prog: &[sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend_from_slice(&(nr as i32).to_ne_bytes());
        data.extend_from_slice(&arch.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        for a in args {
            data.extend_from_slice(&a.to_ne_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = &prog[pc];
            pc += 1;
            match i.code {
                0x20 => {
                    let o = i.k as usize;
                    acc = u32::from_ne_bytes(data[o..o + 4].try_into().unwrap());
                }
                0x54 => acc &= i.k,         // ALU AND K
                0x05 => pc += i.k as usize, // JA
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let t = match i.code {
                        0x15 => acc == i.k,
                        0x25 => acc > i.k,
                        0x35 => acc >= i.k,
                        _ => acc & i.k != 0,
                    };
                    pc += if t { i.jt } else { i.jf } as usize;
                }
                0x06 => return i.k,
                c => panic!("unexpected BPF code {c:#x}"),
            }
        }
    }

    #[test]
    fn the_filter_decides_as_documented() {
        let p = compile().unwrap();
        assert!(p.len() > 50 && p.to_bytes().len() == p.len() * 8);
        let arch = match target_arch() {
            TargetArch::x86_64 => 0xC000_003E,
            _ => 0xC000_00B7,
        };
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        let allow = libc::SECCOMP_RET_ALLOW;
        let ins = &p.instructions;
        assert_eq!(run(ins, arch, libc::SYS_read, [0; 6]), allow);
        assert_eq!(run(ins, arch, libc::SYS_mount, [0; 6]), eperm);
        assert_eq!(run(ins, arch, libc::SYS_unshare, [0; 6]), eperm);
        assert_eq!(run(ins, arch, libc::SYS_bpf, [0; 6]), eperm);
        assert_eq!(run(ins, arch, libc::SYS_ptrace, [0; 6]), eperm);
        assert_eq!(run(ins, arch, libc::SYS_clone3, [0; 6]), enosys);
        let socket = |nr, family: i32| run(ins, arch, nr, [family as u64, 1, 0, 0, 0, 0]);
        assert_eq!(socket(libc::SYS_socket, libc::AF_VSOCK), eperm);
        assert_eq!(socket(libc::SYS_socketpair, libc::AF_VSOCK), eperm);
        assert_eq!(socket(libc::SYS_socket, libc::AF_INET), allow);
        assert_eq!(socket(libc::SYS_socket, libc::AF_UNIX), allow);
        let personality = |p: u64| run(ins, arch, libc::SYS_personality, [p, 0, 0, 0, 0, 0]);
        assert_eq!(personality(0xffff_ffff), allow);
        assert_eq!(personality(0), allow);
        assert_eq!(personality(0x0040_0000), eperm); // READ_IMPLIES_EXEC
        assert_eq!(personality(0x0004_0000), eperm); // ADDR_NO_RANDOMIZE
                                                     // fork-like and thread-like clones pass; a clone into a new namespace does not.
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_THREAD
            | libc::CLONE_SIGHAND) as u64;
        assert_eq!(
            run(ins, arch, libc::SYS_clone, [thread, 0, 0, 0, 0, 0]),
            allow
        );
        assert_eq!(
            run(
                ins,
                arch,
                libc::SYS_clone,
                [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]
            ),
            allow
        );
        for f in CLONE_NAMESPACE_FLAGS {
            let flags = f as u64 | libc::SIGCHLD as u64;
            assert_eq!(
                run(ins, arch, libc::SYS_clone, [flags, 0, 0, 0, 0, 0]),
                eperm
            );
        }
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            run(ins, arch, 0x4000_0000 + libc::SYS_mount, [0; 6]),
            enosys
        );
        // Another architecture is killed.
        assert_eq!(
            run(ins, 0x4000_0003, libc::SYS_read, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        let _ = AUDIT_ARCH_OFFSET;
    }
}
