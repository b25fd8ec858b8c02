//! Small shared helpers: atomic file writes, finite criteria.

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
}
