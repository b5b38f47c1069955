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

/// SD 1.5 on the hub (the old `runwayml/...` repo is gone).
pub const SD15_REPO: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";
/// The CLIP BPE tokenizer as `tokenizer.json` (the SD repo ships only vocab.json + merges.txt).
pub const TOKENIZER_REPO: &str = "openai/clip-vit-base-patch32";

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

    /// The id recorded in outputs (folder path or repo@revision).
    pub fn id(&self) -> String {
        self.to_string()
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

/// The files of an SD 1.5 checkpoint in the diffusers layout.
#[derive(Debug, Clone)]
pub struct SdFiles {
    pub unet_config: PathBuf,
    pub unet_weights: PathBuf,
    pub vae_config: PathBuf,
    pub vae_weights: PathBuf,
    pub text_config: PathBuf,
    pub text_weights: PathBuf,
    pub scheduler_config: PathBuf,
    /// `tokenizer.json`; `None` = use the CLIP tokenizer bundled in the binary.
    pub tokenizer: Option<PathBuf>,
    /// What outputs record as the model id.
    pub id: String,
}

/// Find (and, unless offline, fetch) the files of an SD 1.5 model. A local folder may hold the
/// `.fp16.` weight variants instead of the full ones.
pub fn resolve_sd(source: &ModelSource, offline: bool) -> Result<SdFiles, HubError> {
    let first = |cands: &[&str]| -> Result<PathBuf, HubError> {
        let mut err = None;
        for c in cands {
            match source.file(c, offline) {
                Ok(p) => return Ok(p),
                Err(e) => {
                    if err.is_none() {
                        err = Some(e);
                    }
                    if matches!(source, ModelSource::Hub { .. }) {
                        break;
                    }
                }
            }
        }
        Err(err.expect("at least one candidate"))
    };
    Ok(SdFiles {
        unet_config: first(&["unet/config.json"])?,
        unet_weights: first(&[
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
        ])?,
        vae_config: first(&["vae/config.json"])?,
        vae_weights: first(&[
            "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ])?,
        text_config: first(&["text_encoder/config.json"])?,
        text_weights: first(&[
            "text_encoder/model.safetensors",
            "text_encoder/model.fp16.safetensors",
        ])?,
        scheduler_config: first(&["scheduler/scheduler_config.json"])?,
        // The SD repo has no tokenizer.json; the CLIP repo's is the same BPE. Fall back to the
        // bundled copy when it cannot be had.
        tokenizer: match source {
            ModelSource::Local(dir) => ["tokenizer/tokenizer.json", "tokenizer.json"]
                .iter()
                .map(|c| dir.join(c))
                .find(|p| p.is_file()),
            ModelSource::Hub { .. } => {
                resolve_file(TOKENIZER_REPO, "main", "tokenizer.json", offline).ok()
            }
        },
        id: source.id(),
    })
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
    fn local_sd_folder_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve_sd(&ModelSource::Local(dir.path().into()), true).unwrap_err();
        assert!(e.to_string().contains("unet/config.json"), "{e}");
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
