//! Where weights come from: a local folder, the Hugging Face cache, or a download (SPEC.md §1).
//!
//! This is the only module that uses hf-hub and the `HF_*` variables. The cache is the Python one
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), so downloads made by
//! `huggingface-cli` or diffusers are reused. The cache is always looked up first; the network is
//! touched only when a file is missing there and neither `offline` nor `HF_HUB_OFFLINE=1` is set
//! (hf-hub itself ignores that variable, so it is honoured here).

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a weight file could not be found.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{file} of {repo} (revision {revision}) is not in the Hugging Face cache ({cache}) and \
         the network is off (--offline or HF_HUB_OFFLINE=1); download it once with \
         `huggingface-cli download {repo} {file} --revision {revision}` or rerun without \
         --offline, or pass a local folder that holds {file}"
    )]
    NotCached {
        repo: String,
        revision: String,
        file: String,
        cache: PathBuf,
    },
    #[error(
        "cannot download {file} of {repo} (revision {revision}): {reason}; check the repo id and \
         your connection (HF_ENDPOINT, HF_TOKEN for gated repos), or download it with \
         `huggingface-cli download {repo} {file} --revision {revision}` and rerun with --offline"
    )]
    Download {
        repo: String,
        revision: String,
        file: String,
        reason: String,
    },
    #[error("{path} is missing: the local model folder {folder} must contain {file}")]
    LocalMissing {
        folder: PathBuf,
        file: String,
        path: PathBuf,
    },
}

/// True when `HF_HUB_OFFLINE` is set to `1`/`true` (the variable Python's hub honours).
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("yes"))
        .unwrap_or(false)
}

/// The Hugging Face cache as Python's `huggingface_hub` finds it.
pub fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) if !p.is_empty() => Cache::new(PathBuf::from(p)),
        _ => Cache::from_env(),
    }
}

/// The local path of `file` in the model repo `repo` at `revision` (a branch, tag, commit or
/// `refs/pr/N`): the cached copy when there is one, else a download into the cache, unless
/// `offline` (or `HF_HUB_OFFLINE=1`), which fails naming the repo, revision, file and the fix.
pub fn resolve_file(
    repo: &str,
    revision: &str,
    file: &str,
    offline: bool,
) -> Result<PathBuf, HubError> {
    resolve_file_in(cache(), repo, revision, file, offline)
}

/// [`resolve_file`] with an explicit cache folder.
pub fn resolve_file_in(
    cache: Cache,
    repo: &str,
    revision: &str,
    file: &str,
    offline: bool,
) -> Result<PathBuf, HubError> {
    let hub_repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    if let Some(path) = cache.repo(hub_repo.clone()).get(file) {
        return Ok(path);
    }
    if offline || offline_from_env() {
        return Err(HubError::NotCached {
            repo: repo.into(),
            revision: revision.into(),
            file: file.into(),
            cache: cache.path().clone(),
        });
    }
    let download_err = |reason: String| HubError::Download {
        repo: repo.into(),
        revision: revision.into(),
        file: file.into(),
        reason,
    };
    let mut builder = ApiBuilder::from_cache(cache);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .with_progress(true)
        .build()
        .map_err(|e| download_err(e.to_string()))?;
    api.repo(hub_repo)
        .get(file)
        .map_err(|e| download_err(e.to_string()))
}

/// Where a model's files live: a local folder, or a hub repo at a revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub { repo: String, revision: String },
}

impl ModelSource {
    /// Parse a user's `--clip`/`--dino`/`--model` value: an existing folder is local; otherwise
    /// `owner/name` or `owner/name@revision` is a hub repo (`default_revision` when no `@`).
    pub fn parse(spec: &str, default_revision: &str) -> Result<Self, String> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (spec, default_revision),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let looks_like_repo = parts.len() == 2
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            });
        if !looks_like_repo || revision.is_empty() {
            return Err(format!(
                "`{spec}` is neither an existing folder nor a hub repo id like \
                 `owner/name` or `owner/name@revision`"
            ));
        }
        Ok(Self::Hub {
            repo: repo.into(),
            revision: revision.into(),
        })
    }

    /// The local path of `file` from this source.
    pub fn file(&self, file: &str, offline: bool) -> Result<PathBuf, HubError> {
        match self {
            Self::Local(folder) => {
                let path = folder.join(file);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(HubError::LocalMissing {
                        folder: folder.clone(),
                        file: file.into(),
                        path,
                    })
                }
            }
            Self::Hub { repo, revision } => resolve_file(repo, revision, file, offline),
        }
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Hub { repo, revision } => write!(f, "{repo}@{revision}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sources() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().to_str().unwrap();
        assert_eq!(
            ModelSource::parse(local, "main").unwrap(),
            ModelSource::Local(dir.path().to_path_buf())
        );
        assert_eq!(
            ModelSource::parse("openai/clip-vit-base-patch32", "refs/pr/15").unwrap(),
            ModelSource::Hub {
                repo: "openai/clip-vit-base-patch32".into(),
                revision: "refs/pr/15".into()
            }
        );
        assert_eq!(
            ModelSource::parse("facebook/dino-vits16@main", "refs/pr/1").unwrap(),
            ModelSource::Hub {
                repo: "facebook/dino-vits16".into(),
                revision: "main".into()
            }
        );
        assert!(ModelSource::parse("/no/such/folder/anywhere", "main").is_err());
        assert!(ModelSource::parse("just-a-name", "main").is_err());
    }

    #[test]
    fn offline_miss_names_repo_revision_file_and_fix() {
        // An empty cache: the file cannot be there, and offline forbids the network.
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        let err = resolve_file_in(
            cache,
            "facebook/dino-vits16",
            "refs/pr/1",
            "model.safetensors",
            true,
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "facebook/dino-vits16",
            "refs/pr/1",
            "model.safetensors",
            "huggingface-cli download",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
    }

    #[test]
    fn cached_file_is_found_without_network() {
        // The Python cache layout: refs/<revision> holds the commit, snapshots/<commit>/<file>.
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("models--owner--name");
        std::fs::create_dir_all(repo_dir.join("refs/refs/pr")).unwrap();
        std::fs::write(repo_dir.join("refs/refs/pr/7"), "abc123").unwrap();
        std::fs::create_dir_all(repo_dir.join("snapshots/abc123")).unwrap();
        std::fs::write(repo_dir.join("snapshots/abc123/config.json"), "{}").unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        let found = resolve_file_in(cache, "owner/name", "refs/pr/7", "config.json", true);
        assert_eq!(
            found.unwrap(),
            repo_dir.join("snapshots/abc123/config.json")
        );
    }
}
