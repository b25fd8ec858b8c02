//! Small shared helpers: atomic file writes, the worker pool.

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

/// Build rayon's global pool the way every loracomp entry point runs (`threads`: `None` = all cores; workers get
/// the main thread's usual 8 MiB of stack, as whole commands run on one). A second call in one process (a library
/// caller, the Python package) finds the pool built: fine unless it asks for another thread count.
pub fn init_pool(threads: Option<usize>) -> Result<()> {
    let built = rayon::ThreadPoolBuilder::new().num_threads(threads.unwrap_or(0)).stack_size(8 << 20).build_global();
    if let Err(e) = built {
        if let Some(t) = threads.filter(|&t| t != rayon::current_num_threads()) {
            anyhow::bail!("--threads {t}: the worker pool already runs {} threads ({e})", rayon::current_num_threads());
        }
    }
    Ok(())
}
