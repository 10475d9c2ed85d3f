//! Where Specula keeps what it fetches or builds once: the default model and compiled
//! kernels.

use std::path::PathBuf;

/// Environment variable naming the cache folder (default `~/.cache/specula`).
pub const CACHE_ENV: &str = "SPECULA_CACHE";

/// `$SPECULA_CACHE`, else `$XDG_CACHE_HOME/specula`, else `~/.cache/specula`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("specula")
}
