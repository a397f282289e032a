//! The only home of `unsafe` and raw `libc`: resource limits, CPU affinity and the few socket
//! and process calls that the safe crates lack. Each block says why it is sound. Nothing here
//! keeps state; callers decide policy.
#![allow(unsafe_code)]

use std::io;

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

/// Read a cgroup v2 (or v1) file of this process as trimmed text.
fn cgroup_file(v2: &str, v1: &str) -> Option<String> {
    let base = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string()))
        })
        .unwrap_or_default();
    let mut candidates = vec![
        format!("/sys/fs/cgroup{base}/{v2}"),
        format!("/sys/fs/cgroup/{v2}"),
    ];
    candidates.push(format!("/sys/fs/cgroup/{v1}"));
    candidates
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
}

/// The cgroup CPU quota in CPUs (e.g. 1.5), if one is set.
pub fn cgroup_cpu_quota() -> Option<f64> {
    let text = cgroup_file("cpu.max", "cpu/cpu.cfs_quota_us")?;
    let mut it = text.split_whitespace();
    let quota = it.next()?;
    if quota == "max" || quota == "-1" {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    let period: f64 = match it.next() {
        Some(p) => p.parse().ok()?,
        // cgroup v1: the period is in a file of its own.
        None => std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
            .ok()?
            .trim()
            .parse()
            .ok()?,
    };
    (quota > 0.0 && period > 0.0).then_some(quota / period)
}

/// The cgroup memory limit in bytes, if one is set.
pub fn cgroup_memory_limit() -> Option<u64> {
    let text = cgroup_file("memory.max", "memory/memory.limit_in_bytes")?;
    let v: u64 = text.parse().ok()?;
    // cgroup v1 reports "no limit" as a huge number.
    (v < (1u64 << 60)).then_some(v)
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
