//! The only home of `unsafe` and raw `libc`: resource limits, CPU affinity and the few socket
//! and process calls that the safe crates lack. Each block says why it is sound. Nothing here
//! keeps state; callers decide policy.
#![allow(unsafe_code)]

use std::io;
use std::path::{Path, PathBuf};

/// Raise the soft RLIMIT_NOFILE to the hard limit. Returns the resulting soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit; setrlimit only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
}

/// Set the soft RLIMIT_NOFILE to `soft` (at most the hard limit), e.g. to provoke EMFILE in
/// the selftest's child. Returns the new soft limit.
pub fn set_nofile_soft_limit(soft: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let want = libc::rlimit {
        rlim_cur: soft.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: `want` is a valid rlimit; setrlimit only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(want.rlim_cur)
}

/// The CPUs this thread may run on (sched_getaffinity), in ascending order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid and writable, and the size passed is its exact size.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cpus = Vec::new();
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `cpu` is below CPU_SETSIZE, the bound CPU_ISSET requires.
        if unsafe { libc::CPU_ISSET(cpu, &set) } {
            cpus.push(cpu);
        }
    }
    Ok(cpus)
}

/// Pin the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpu {cpu} out of range"),
        ));
    }
    // SAFETY: cpu_set_t is plain data; all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` was checked to be below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu set of the size passed; 0 means the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CPU time (user + system) of this process, in seconds.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data; all-zero is a valid value to be overwritten.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid and writable for the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A kernel pipe for splice(2): read end, write end. Both non-blocking and close-on-exec.
#[derive(Debug)]
pub struct Pipe {
    pub r: std::os::fd::OwnedFd,
    pub w: std::os::fd::OwnedFd,
}

/// Create a non-blocking pipe.
pub fn pipe() -> io::Result<Pipe> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (r, w) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    Ok(Pipe { r, w })
}

/// Set a pipe's capacity (fcntl F_SETPIPE_SZ; the kernel rounds up to a power-of-two number
/// of pages). Returns the capacity granted. Fails (EPERM) above `/proc/sys/fs/pipe-max-size`
/// or once this user's pipes are over `pipe-user-pages-soft`; the pipe keeps its size then.
pub fn set_pipe_size(pipe: &Pipe, bytes: usize) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: fcntl on a pipe fd we own; F_SETPIPE_SZ takes an int and passes no memory.
    let n = unsafe { libc::fcntl(pipe.w.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A pipe's capacity in bytes (fcntl F_GETPIPE_SZ).
pub fn pipe_size(pipe: &Pipe) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a pipe fd we own; F_GETPIPE_SZ passes no memory.
    let n = unsafe { libc::fcntl(pipe.w.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The per-user cap, in pages, on pipe capacity beyond which new pipes are created small
/// and F_SETPIPE_SZ is refused (`/proc/sys/fs/pipe-user-pages-soft`; 0 = none). `None` when
/// it cannot be read.
pub fn pipe_user_pages_soft() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// splice(2) up to `len` bytes from `fd_in` to `fd_out` without blocking.
pub fn splice(
    fd_in: std::os::fd::RawFd,
    fd_out: std::os::fd::RawFd,
    len: usize,
) -> io::Result<usize> {
    // SAFETY: plain syscall on caller-provided fds with null offsets (both are pipes or
    // sockets); no memory is passed to the kernel.
    let n = unsafe {
        libc::splice(
            fd_in,
            std::ptr::null_mut(),
            fd_out,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Where the cgroup files are read from: `/` (so `/proc/self/cgroup` and `/sys/fs/cgroup`),
/// or the directory named by `EPOXY_CGROUP_ROOT`, which holds the same two paths (tests point
/// it at a fake tree; it also serves hosts that mount the hierarchy elsewhere).
pub fn cgroup_root() -> PathBuf {
    std::env::var_os("EPOXY_CGROUP_ROOT")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

/// The cgroup directories that may limit this process for one controller, most specific
/// first: for cgroup v2 the process's own cgroup and each ancestor up to the mount; for v1
/// the same inside the controller's hierarchy (`v1_dirs`: its possible mount names, e.g.
/// `cpu,cpuacct`). A path that the mount does not show (a v1 container sees its own cgroup
/// at the mount's root) falls back to the mount itself. `v2` says which layout was found.
fn cgroup_dirs(root: &Path, v1_controller: &str, v1_dirs: &[&str]) -> (bool, Vec<PathBuf>) {
    let mount = root.join("sys/fs/cgroup");
    let table = std::fs::read_to_string(root.join("proc/self/cgroup")).unwrap_or_default();
    let levels = |base: &Path, path: &str| -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut p = base.join(path.trim_start_matches('/'));
        while p.starts_with(base) {
            if p.is_dir() {
                out.push(p.clone());
            }
            if !p.pop() {
                break;
            }
        }
        if out.is_empty() {
            out.push(base.to_path_buf());
        }
        out
    };
    let v2_path = table.lines().find_map(|l| l.strip_prefix("0::"));
    if mount.join("cgroup.controllers").is_file() {
        return (true, levels(&mount, v2_path.unwrap_or("/").trim()));
    }
    let v1_path = table.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        ctrls
            .split(',')
            .any(|c| c == v1_controller)
            .then(|| path.trim().to_string())
    });
    let dirs = v1_dirs
        .iter()
        .map(|d| mount.join(d))
        .find(|d| d.is_dir())
        .map(|base| levels(&base, v1_path.as_deref().unwrap_or("/")))
        .unwrap_or_default();
    (false, dirs)
}

/// A cgroup file as trimmed text; `None` when missing or unreadable (logged at debug).
fn cgroup_read(path: &Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                log::debug!("cgroup: cannot read {}: {e}", path.display());
            }
            None
        }
    }
}

/// The cgroup CPU quota in CPUs (e.g. 1.5), if one is set (the smallest on the path).
pub fn cgroup_cpu_quota() -> Option<f64> {
    cgroup_cpu_quota_in(&cgroup_root())
}

/// [`cgroup_cpu_quota`] under another root (see [`cgroup_root`]).
pub fn cgroup_cpu_quota_in(root: &Path) -> Option<f64> {
    let (v2, dirs) = cgroup_dirs(root, "cpu", &["cpu", "cpu,cpuacct", "cpuacct,cpu"]);
    let quota_at = |dir: &PathBuf| -> Option<f64> {
        let (quota, period) = if v2 {
            let text = cgroup_read(&dir.join("cpu.max"))?;
            let mut it = text.split_whitespace();
            let q = it.next()?.to_string();
            (q, it.next().map(str::to_string))
        } else {
            let q = cgroup_read(&dir.join("cpu.cfs_quota_us"))?;
            (q, cgroup_read(&dir.join("cpu.cfs_period_us")))
        };
        if quota == "max" || quota == "-1" {
            return None;
        }
        let quota: f64 = quota.parse().ok()?;
        let period: f64 = period?.parse().ok()?;
        (quota > 0.0 && period > 0.0).then_some(quota / period)
    };
    dirs.iter().filter_map(quota_at).reduce(f64::min)
}

/// The cgroup memory limit in bytes, if one is set (the smallest on the path).
pub fn cgroup_memory_limit() -> Option<u64> {
    cgroup_memory_limit_in(&cgroup_root())
}

/// [`cgroup_memory_limit`] under another root (see [`cgroup_root`]).
pub fn cgroup_memory_limit_in(root: &Path) -> Option<u64> {
    let (v2, dirs) = cgroup_dirs(root, "memory", &["memory"]);
    let file = if v2 {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    dirs.iter()
        .filter_map(|d| cgroup_read(&d.join(file)))
        .filter_map(|text| text.parse::<u64>().ok())
        // cgroup v1 reports "no limit" as a huge number (v2 writes "max", which does not parse).
        .filter(|&v| v < (1u64 << 60))
        .min()
}

/// Zero-filled memory reserved with mmap(MAP_NORESERVE): pages cost nothing until touched,
/// and a refusal (strict overcommit, address-space limits) is an error instead of an abort.
pub struct ZeroedRegion {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value alone; access goes through
// `&self`/`&mut self` borrows, so the usual aliasing rules apply across threads.
unsafe impl Send for ZeroedRegion {}

impl ZeroedRegion {
    pub fn new(len: usize) -> io::Result<ZeroedRegion> {
        if len == 0 {
            return Ok(ZeroedRegion {
                ptr: std::ptr::NonNull::dangling(),
                len: 0,
            });
        }
        // SAFETY: an anonymous private mapping with a null hint; no existing memory is
        // affected, and the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(ZeroedRegion { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `len` readable and writable bytes (zero-filled by the
        // kernel) that live as long as `self`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for ZeroedRegion {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly the mapping created in `new`, once.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// Most descriptors one [`send_with_fds`] call carries (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS_PER_MESSAGE: usize = 200;

/// Send `data` on a Unix stream socket with `fds` attached (SCM_RIGHTS). Returns the bytes
/// sent (the caller writes any rest without descriptors). At most [`MAX_FDS_PER_MESSAGE`].
pub fn send_with_fds(
    sock: &std::os::unix::net::UnixStream,
    data: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<usize> {
    use std::os::fd::{AsRawFd, RawFd};
    if fds.len() > MAX_FDS_PER_MESSAGE || data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "send_with_fds: empty data or too many descriptors",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `control`, which is `space` bytes, aligned, and large
        // enough for one header with `payload` bytes of data (CMSG_SPACE above), so
        // CMSG_FIRSTHDR is non-null and CMSG_DATA has room for `raw`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (borrowing `data`) and `control`, all alive for the
        // call; the descriptors are borrowed from the caller, so they are open.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receive into `buf` from a Unix stream socket; descriptors that came with the bytes are
/// appended to `fds` (close-on-exec). Returns the bytes read (0 = end of stream). A message
/// whose descriptors did not all fit (`MSG_CTRUNC`) is an error; any that did arrive are
/// closed.
pub fn recv_with_fds(
    sock: &std::os::unix::net::UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
) -> io::Result<usize> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    let payload = MAX_FDS_PER_MESSAGE * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (borrowing `buf` mutably) and `control`, both alive
        // and writable for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut got = Vec::new();
    // SAFETY: recvmsg filled `control` and set msg_controllen; the CMSG_* macros walk only
    // within it. Each SCM_RIGHTS payload is an array of descriptors the kernel just installed
    // in this process, owned by nobody else, so wrapping each in an OwnedFd is sound;
    // read_unaligned copes with the byte-aligned data pointer.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = len / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let p = data.add(i * std::mem::size_of::<RawFd>()) as *const RawFd;
                    got.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p)));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        drop(got);
        return Err(io::Error::other(
            "descriptors were truncated (MSG_CTRUNC): the open-files limit is too low",
        ));
    }
    fds.extend(got);
    Ok(n)
}

/// A duplicate of `fd` that a child process inherits (no close-on-exec), numbered 3 or up.
pub fn dup_inheritable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: F_DUPFD on a borrowed, open descriptor; it does not set FD_CLOEXEC.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 3) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(n) })
}

/// Take ownership of descriptor `n`, passed to this process by its parent (the upgrade
/// channel) or by systemd (`LISTEN_FDS`): it must be open; it is set close-on-exec. Descriptors
/// 0-2 are refused.
pub fn adopt_fd(n: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    if n < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {n} is a standard stream"),
        ));
    }
    // SAFETY: F_GETFD only queries the descriptor table.
    let flags = unsafe { libc::fcntl(n, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFD on a descriptor just checked to be open.
    if unsafe { libc::fcntl(n, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n` is open and was handed to this process to own (environment protocol of the
    // caller); this is the only place that wraps it, once.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(n) })
}

/// tee(2): copy up to `len` bytes from pipe `fd_in` to pipe `fd_out` without consuming them.
pub fn tee(fd_in: std::os::fd::RawFd, fd_out: std::os::fd::RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on caller-provided pipe fds; no memory is passed to the kernel.
    let n = unsafe { libc::tee(fd_in, fd_out, len, libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// read(2) from a descriptor (a pipe) into `buf`.
pub fn read_fd(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid and writable for `buf.len()` bytes during the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// write(2) `buf` to a descriptor (a pipe).
pub fn write_fd(fd: std::os::fd::RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid and readable for `buf.len()` bytes during the call.
    let n = unsafe { libc::write(fd, buf.as_ptr() as *const libc::c_void, buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_grows_to_the_size_asked_and_reports_it() {
        let p = pipe().unwrap();
        // (A fresh pipe is 64 KiB, or 2 pages once the user is over pipe-user-pages-soft.)
        assert!(pipe_size(&p).unwrap() < 256 << 10);
        assert!(set_pipe_size(&p, 256 << 10).unwrap() >= 256 << 10);
        assert!(pipe_size(&p).unwrap() >= 256 << 10);
    }

    /// A fake cgroup tree under a fresh temp directory, removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(proc_self_cgroup: &str) -> Tree {
            static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let root =
                std::env::temp_dir().join(format!("epoxy-cgroup-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let t = Tree(root);
            t.write("proc/self/cgroup", proc_self_cgroup);
            t
        }
        fn write(&self, rel: &str, text: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        fn mkdir(&self, rel: &str) {
            std::fs::create_dir_all(self.0.join(rel)).unwrap();
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const MIB: u64 = 1 << 20;

    fn v2(path: &str) -> Tree {
        let t = Tree::new(&format!("0::{path}\n"));
        t.write("sys/fs/cgroup/cgroup.controllers", "cpu memory io\n");
        t
    }

    #[test]
    fn v2_limits_come_from_the_own_cgroup_and_its_ancestors() {
        let t = v2("/kubepods/pod1/c1");
        t.write("sys/fs/cgroup/kubepods/pod1/c1/memory.max", "268435456\n");
        t.write("sys/fs/cgroup/kubepods/pod1/memory.max", "1073741824\n");
        t.write("sys/fs/cgroup/kubepods/memory.max", "max\n");
        t.write("sys/fs/cgroup/kubepods/pod1/c1/cpu.max", "150000 100000\n");
        assert_eq!(cgroup_memory_limit_in(&t.0), Some(256 * MIB));
        assert_eq!(cgroup_cpu_quota_in(&t.0), Some(1.5));
        // A tighter ancestor wins.
        t.write("sys/fs/cgroup/kubepods/pod1/memory.max", "134217728\n");
        t.write("sys/fs/cgroup/kubepods/cpu.max", "50000 100000\n");
        assert_eq!(cgroup_memory_limit_in(&t.0), Some(128 * MIB));
        assert_eq!(cgroup_cpu_quota_in(&t.0), Some(0.5));
    }

    #[test]
    fn v2_unlimited_is_none() {
        let t = v2("/");
        t.write("sys/fs/cgroup/memory.max", "max\n");
        t.write("sys/fs/cgroup/cpu.max", "max 100000\n");
        assert_eq!(cgroup_memory_limit_in(&t.0), None);
        assert_eq!(cgroup_cpu_quota_in(&t.0), None);
        // A container with its own namespace sees "/" and the files at the mount's root.
        t.write("sys/fs/cgroup/memory.max", "536870912\n");
        assert_eq!(cgroup_memory_limit_in(&t.0), Some(512 * MIB));
    }

    #[test]
    fn v1_limits_and_unlimited() {
        let t = Tree::new("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/x\n");
        t.write(
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        t.write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
        t.write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
        assert_eq!(cgroup_memory_limit_in(&t.0), None, "v1 'unlimited'");
        assert_eq!(cgroup_cpu_quota_in(&t.0), None);
        // Inside the container the mount root is its own cgroup.
        t.write("sys/fs/cgroup/memory/memory.limit_in_bytes", "1073741824\n");
        t.write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "250000\n");
        assert_eq!(cgroup_memory_limit_in(&t.0), Some(1024 * MIB));
        assert_eq!(cgroup_cpu_quota_in(&t.0), Some(2.5));
        // On the host the path is visible, and its limit is the tighter one.
        t.write(
            "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
            "67108864\n",
        );
        assert_eq!(cgroup_memory_limit_in(&t.0), Some(64 * MIB));
    }

    #[test]
    fn unreadable_or_garbled_files_mean_no_limit() {
        let t = v2("/a");
        // A directory where the file should be: read fails (EISDIR) even for root.
        t.mkdir("sys/fs/cgroup/a/memory.max");
        t.write("sys/fs/cgroup/a/cpu.max", "lots 100000\n");
        assert_eq!(cgroup_memory_limit_in(&t.0), None);
        assert_eq!(cgroup_cpu_quota_in(&t.0), None);
        t.write("sys/fs/cgroup/cpu.max", "100000 0\n");
        assert_eq!(cgroup_cpu_quota_in(&t.0), None, "zero period");
        // No tree at all.
        let empty = Tree::new("");
        assert_eq!(cgroup_memory_limit_in(&empty.0), None);
        assert_eq!(cgroup_cpu_quota_in(&empty.0), None);
        let missing = Path::new("/nonexistent/epoxy-cgroup");
        assert_eq!(cgroup_memory_limit_in(missing), None);
    }
}
