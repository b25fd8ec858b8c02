//! Small shared helpers: atomic file writes, the worker pool, checks before reading files and allocating, finite
//! criteria.

use anyhow::{anyhow, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` through a temporary file in the same directory and a rename, so that a reader
/// (or a killed process) never sees a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
    let name = path.file_name().ok_or_else(|| anyhow!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow!("cannot write {}: {e}", path.display()));
    }
    remove_stale_temporaries(dir, &name.to_string_lossy());
    Ok(())
}

/// Remove `.{name}.PID.tmp` files in `dir` that a killed writer of `name` left (its process no longer runs):
/// they are this file's temporaries, named by [`write_atomic`], and a finished write makes them useless.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let prefix = format!(".{name}.");
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let Some(pid) = file.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".tmp")) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !process_running(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether process `pid` runs (Linux `/proc/PID/stat`): a zombie — killed, not yet reaped — does not.
pub fn process_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // "pid (comm) S ...": the state follows the last ')', as comm may hold spaces and parentheses.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// One writer at a time per output directory: `DIR/<file>` holds the writer's process id, is created exclusively
/// and removed when the lock is dropped. A lock left by a process that no longer runs (killed) is taken over; one
/// this process already holds is shared (a sweep takes it, then the commands it runs take their own). A directory
/// the lock created is removed again when the lock goes and nothing else was written there.
pub struct DirLock {
    path: Option<PathBuf>,
    /// Directories `take` created, deepest first.
    created: Vec<PathBuf>,
}

impl DirLock {
    /// Take `dir/file` for `what` (a word for the error message: "sweep", "train").
    pub fn take(dir: &Path, file: &str, what: &str) -> Result<Self> {
        let created: Vec<PathBuf> =
            dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).map(Path::to_path_buf).collect();
        std::fs::create_dir_all(dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(file);
        for _ in 0..2 {
            match std::fs::File::create_new(&path) {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id()).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
                    return Ok(DirLock { path: Some(path), created });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let pid: Option<u32> = holder.trim().parse().ok();
                    if pid == Some(std::process::id()) {
                        return Ok(DirLock { path: None, created: Vec::new() });
                    }
                    let alive = pid.is_some_and(process_running);
                    if alive || !Path::new("/proc/self").exists() {
                        return Err(anyhow!(
                            "{}: another {what} (process {}) is writing to this directory; wait for it, or delete \
                             the lock file if that process is gone",
                            path.display(),
                            holder.trim()
                        ));
                    }
                    // stale: its process was killed; take it over
                    std::fs::remove_file(&path).map_err(|e| anyhow!("cannot remove {}: {e}", path.display()))?;
                }
                Err(e) => return Err(anyhow!("cannot create {}: {e}", path.display())),
            }
        }
        Err(anyhow!("{}: could not take the {what} lock", path.display()))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
        for d in &self.created {
            if std::fs::remove_dir(d).is_err() {
                break; // not empty: something was written there, keep it and its parents
            }
        }
    }
}

/// Files removed when this guard is dropped (temporaries of a step that may fail half-way); a file already
/// renamed away is simply not there any more.
pub struct TempFiles(pub Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Refuse to read `path` when it exists but is not a regular file: a FIFO would block for ever, a device may
/// stream without end. A missing file is left to the read that follows, which names it.
pub fn ensure_regular(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            let kind = if m.is_dir() { "a directory" } else { "a device, FIFO or socket" };
            Err(anyhow!("{}: not a regular file ({kind}); refusing to read it", path.display()))
        }
        _ => Ok(()),
    }
}

/// Memory this process may still take: `MemAvailable` from /proc/meminfo, or [`FALLBACK_MEMORY`] where that
/// cannot be read.
pub fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kb.checked_mul(1024)
        })
        .unwrap_or(FALLBACK_MEMORY)
}

/// The memory assumed available where /proc/meminfo cannot be read (16 GiB).
pub const FALLBACK_MEMORY: u64 = 16 << 30;

fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Refuse `what` when its estimated size, `bytes` (`None`: beyond u128), exceeds the memory available, before
/// anything is allocated: an allocation that cannot be served aborts the process (no error, no message).
pub fn check_fits(bytes: Option<u128>, what: &str) -> Result<()> {
    if bytes.is_some_and(|b| b <= 64 << 20) {
        return Ok(()); // small: not worth reading /proc/meminfo
    }
    let avail = available_memory() as u128;
    match bytes {
        Some(b) if b <= avail => Ok(()),
        Some(b) => Err(anyhow!(
            "{what} needs about {} of memory ({b} bytes), more than the {} available (MemAvailable, /proc/meminfo)",
            gib(b),
            gib(avail)
        )),
        None => Err(anyhow!("{what} needs more memory than can be counted (over 2^128 bytes)")),
    }
}

/// One standard normal draw (Box–Muller), from any seeded generator.
pub fn normal(rng: &mut impl rand::Rng) -> f32 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Refuse a NaN or infinite value among `values`: the error says `"{source}: the criterion of {item} {i} is
/// {v}"`, so a comparison that follows (`total_cmp`) never ranks a NaN and no `partial_cmp(..).unwrap()` panics.
pub fn ensure_finite(values: impl IntoIterator<Item = f64>, source: &str, item: &str) -> Result<()> {
    for (i, v) in values.into_iter().enumerate() {
        if !v.is_finite() {
            return Err(anyhow!("{source}: the criterion of {item} {i} is {v}"));
        }
    }
    Ok(())
}

/// Most worker threads loracomp starts: rayon reserves each worker's stack and per-thread state before it can
/// report an error, so an absurd count is refused first.
pub const MAX_THREADS: usize = 4096;
/// Each worker's stack: the main thread's usual 8 MiB, as whole commands run on a worker.
pub const WORKER_STACK: usize = 8 << 20;

/// Build rayon's global pool the way every loracomp entry point runs (`threads`: `None` = all cores, or
/// `RAYON_NUM_THREADS`). A second call in one process (a library caller, the Python package) finds the pool
/// built: fine unless it asks for another thread count. A count above [`MAX_THREADS`], or threads that cannot
/// be started, are errors (rayon's lazily built default pool would panic on the same failure).
pub fn init_pool(threads: Option<usize>) -> Result<()> {
    let asked = threads.or_else(|| std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.trim().parse().ok()));
    if let Some(n) = asked.filter(|&n| n > MAX_THREADS) {
        let stacks = (n as u128) * (WORKER_STACK as u128);
        anyhow::bail!(
            "--threads {n} (or RAYON_NUM_THREADS): at most {MAX_THREADS} worker threads ({n} would reserve about {} \
             GiB of stack); this machine has {} cores",
            stacks >> 30,
            std::thread::available_parallelism().map_or(1, |p| p.get())
        );
    }
    let built =
        rayon::ThreadPoolBuilder::new().num_threads(threads.unwrap_or(0)).stack_size(WORKER_STACK).build_global();
    if let Err(e) = built {
        if !e.to_string().contains("already been initialized") {
            anyhow::bail!("--threads: cannot start the worker threads: {e}");
        }
        if let Some(t) = threads.filter(|&t| t != rayon::current_num_threads()) {
            anyhow::bail!("--threads {t}: the worker pool already runs {} threads ({e})", rayon::current_num_threads());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_criteria_are_an_error_naming_the_source_not_a_panic() {
        assert!(ensure_finite([3.0, 1.0, 1.0, 2.0], "bench timings", "iteration").is_ok());
        let e = ensure_finite([3.0, 1.0, 2.0, f64::NAN], "SVD of ΔW", "singular value").unwrap_err();
        assert_eq!(e.to_string(), "SVD of ΔW: the criterion of singular value 3 is NaN");
        let e = ensure_finite([f64::NEG_INFINITY], "bench timings", "iteration").unwrap_err();
        assert_eq!(e.to_string(), "bench timings: the criterion of iteration 0 is -inf");
        assert!(ensure_finite([], "bench timings", "iteration").is_ok());
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("loracomp-util-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_finished_write_removes_the_temporaries_killed_writers_left() {
        let d = scratch("stale");
        std::fs::create_dir_all(&d).unwrap();
        let dead = d.join(".model.safetensors.4194303.tmp"); // above Linux's pid_max: no such process
        let own = d.join(format!(".model.safetensors.{}.tmp", std::process::id()));
        let parent = d.join(format!(".model.safetensors.{}.tmp", std::os::unix::process::parent_id()));
        let other = d.join(".other.json.4194303.tmp");
        for p in [&dead, &parent, &other] {
            std::fs::write(p, b"partial").unwrap();
        }
        write_atomic(&d.join("model.safetensors"), b"weights").unwrap();
        assert!(!dead.exists(), "a dead writer's temporary is removed");
        assert!(!own.exists(), "this write's own temporary was renamed");
        assert!(parent.exists(), "a running process's temporary is kept");
        assert!(other.exists(), "another file's temporary is not this write's to remove");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_lock_refuses_a_live_holder_and_removes_the_directory_it_created() {
        let root = scratch("lock");
        let d = root.join("a/b");
        {
            let _l = DirLock::take(&d, ".train.lock", "train").unwrap();
            assert!(d.join(".train.lock").exists());
            // shared within one process
            let _again = DirLock::take(&d, ".train.lock", "train").unwrap();
        }
        assert!(!d.exists() && !d.parent().unwrap().exists(), "nothing written: the created directories go too");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(".train.lock"), std::os::unix::process::parent_id().to_string()).unwrap();
        let e = DirLock::take(&d, ".train.lock", "train").err().unwrap().to_string();
        assert!(e.contains(".train.lock: another train (process") && e.contains("is writing"), "{e}");
        std::fs::write(d.join(".train.lock"), "4194303").unwrap();
        drop(DirLock::take(&d, ".train.lock", "train").unwrap()); // a dead holder's lock is taken over
        assert!(d.exists(), "a directory that was there before stays");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn fifos_and_directories_are_not_read() {
        let d = scratch("fifo");
        std::fs::create_dir_all(&d).unwrap();
        let fifo = d.join("train.jsonl");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let e = ensure_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("train.jsonl: not a regular file (a device, FIFO or socket)"), "{e}");
        assert!(ensure_regular(&d).unwrap_err().to_string().contains("(a directory)"));
        assert!(ensure_regular(&d.join("missing")).is_ok(), "left to the read, which names it");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sizes_beyond_memory_are_refused_with_the_estimate() {
        assert!(check_fits(Some(1 << 20), "small").is_ok());
        let e = check_fits(Some(1 << 80), "--rank 9").unwrap_err().to_string();
        assert!(e.starts_with("--rank 9 needs about") && e.contains("GiB") && e.contains("MemAvailable"), "{e}");
        assert!(check_fits(None, "x").is_err());
    }
}
