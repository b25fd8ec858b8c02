//! Small shared helpers: atomic file writes, checks before reading files and allocating, finite criteria.

use anyhow::{anyhow, Result};
use std::io::Write;
use std::path::Path;

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
    Ok(())
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

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("loracomp-util-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
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
