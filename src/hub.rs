//! Where weights come from: a local folder, the Hugging Face cache, or a download. The only user
//! of hf-hub and the `HF_*` variables. The cache is looked up first and without the network
//! (`Cache::from_env()`: the Python layout, so users' existing downloads are reused); offline mode
//! (`--offline` or `HF_HUB_OFFLINE=1`, which hf-hub itself ignores) never downloads.

use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// SD 1.5 on the hub (the old `runwayml/...` repo is gone).
pub const SD15_REPO: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";
/// The CLIP BPE tokenizer as `tokenizer.json` (the SD repo ships only vocab.json + merges.txt).
pub const TOKENIZER_REPO: &str = "openai/clip-vit-base-patch32";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("offline, and {repo} (revision {revision}) file {file} is not in the Hugging Face cache at {cache}. Fix: run once without --offline / HF_HUB_OFFLINE=1 to download it, or `huggingface-cli download {repo} {file} --revision {revision}`, or pass a local folder")]
    NotCached {
        repo: String,
        revision: String,
        file: String,
        cache: String,
    },
    #[error("could not download {repo} (revision {revision}) file {file}: {source}. Fix: check the network and the repo id, set HF_TOKEN if the repo is gated, or pass a local folder (use --offline to stop trying the network)")]
    Download {
        repo: String,
        revision: String,
        file: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("model folder {0} does not exist. Fix: pass an existing folder in the diffusers layout, or a Hugging Face repo id such as {SD15_REPO}")]
    MissingFolder(PathBuf),
    #[error("{path} is missing from model folder {folder}. Fix: {fix}")]
    MissingFile {
        folder: PathBuf,
        path: String,
        fix: String,
    },
}

/// A model named on the command line: a folder that exists, or a hub repo id (`owner/name`,
/// optionally `@revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub { repo: String, revision: String },
}

impl ModelSource {
    pub fn parse(s: &str) -> Result<Self, HubError> {
        let p = Path::new(s);
        if p.is_dir() {
            return Ok(Self::Local(p.to_path_buf()));
        }
        let looks_local = s.starts_with('.') || s.starts_with('/') || s.starts_with('~') || s.matches('/').count() != 1;
        if looks_local {
            return Err(HubError::MissingFolder(p.to_path_buf()));
        }
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r.to_string(), rev.to_string()),
            None => (s.to_string(), "main".to_string()),
        };
        Ok(Self::Hub { repo, revision })
    }

    /// The id recorded in outputs (folder path or repo@revision).
    pub fn id(&self) -> String {
        match self {
            Self::Local(p) => p.display().to_string(),
            Self::Hub { repo, revision } => format!("{repo}@{revision}"),
        }
    }
}

/// Whether offline mode is on through the environment (`HF_HUB_OFFLINE=1`).
pub fn env_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("yes"))
        .unwrap_or(false)
}

/// One file of a hub repo: from the cache, else downloaded unless offline.
pub fn resolve_file(repo: &str, revision: &str, file: &str, offline: bool) -> Result<PathBuf, HubError> {
    let offline = offline || env_offline();
    let cache = Cache::from_env();
    let r = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    if let Some(p) = cache.repo(r.clone()).get(file) {
        return Ok(p);
    }
    if offline {
        return Err(HubError::NotCached {
            repo: repo.into(),
            revision: revision.into(),
            file: file.into(),
            cache: cache.path().display().to_string(),
        });
    }
    let dl_err = |e: Box<dyn std::error::Error + Send + Sync>| HubError::Download {
        repo: repo.into(),
        revision: revision.into(),
        file: file.into(),
        source: e,
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| dl_err(Box::new(e)))?;
    api.repo(r).get(file).map_err(|e| dl_err(Box::new(e)))
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

/// Find (and, online, fetch) the files of an SD 1.5 model.
pub fn resolve_sd(source: &ModelSource, offline: bool) -> Result<SdFiles, HubError> {
    match source {
        ModelSource::Local(dir) => {
            let pick = |cands: &[&str], fix: &str| -> Result<PathBuf, HubError> {
                cands
                    .iter()
                    .map(|c| dir.join(c))
                    .find(|p| p.is_file())
                    .ok_or_else(|| HubError::MissingFile {
                        folder: dir.clone(),
                        path: cands[0].to_string(),
                        fix: fix.to_string(),
                    })
            };
            let fix = format!(
                "copy the diffusers folders (unet, vae, text_encoder, scheduler) of {SD15_REPO} into it"
            );
            Ok(SdFiles {
                unet_config: pick(&["unet/config.json"], &fix)?,
                unet_weights: pick(
                    &["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"],
                    &fix,
                )?,
                vae_config: pick(&["vae/config.json"], &fix)?,
                vae_weights: pick(
                    &["vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"],
                    &fix,
                )?,
                text_config: pick(&["text_encoder/config.json"], &fix)?,
                text_weights: pick(
                    &["text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"],
                    &fix,
                )?,
                scheduler_config: pick(&["scheduler/scheduler_config.json"], &fix)?,
                tokenizer: ["tokenizer/tokenizer.json", "tokenizer.json"]
                    .iter()
                    .map(|c| dir.join(c))
                    .find(|p| p.is_file()),
                id: source.id(),
            })
        }
        ModelSource::Hub { repo, revision } => {
            let get = |f: &str| resolve_file(repo, revision, f, offline);
            Ok(SdFiles {
                unet_config: get("unet/config.json")?,
                unet_weights: get("unet/diffusion_pytorch_model.safetensors")?,
                vae_config: get("vae/config.json")?,
                vae_weights: get("vae/diffusion_pytorch_model.safetensors")?,
                text_config: get("text_encoder/config.json")?,
                text_weights: get("text_encoder/model.safetensors")?,
                scheduler_config: get("scheduler/scheduler_config.json")?,
                // The SD repo has no tokenizer.json; the CLIP repo's is the same BPE. Fall back to
                // the bundled copy when it cannot be had.
                tokenizer: resolve_file(TOKENIZER_REPO, "main", "tokenizer.json", offline).ok(),
                id: source.id(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sources() {
        assert_eq!(
            ModelSource::parse("stable-diffusion-v1-5/stable-diffusion-v1-5").unwrap(),
            ModelSource::Hub {
                repo: SD15_REPO.into(),
                revision: "main".into()
            }
        );
        assert!(matches!(
            ModelSource::parse("openai/clip-vit-base-patch32@refs/pr/15").unwrap(),
            ModelSource::Hub { revision, .. } if revision == "refs/pr/15"
        ));
        assert!(matches!(ModelSource::parse("./no/such/dir"), Err(HubError::MissingFolder(_))));
        assert!(matches!(ModelSource::parse("src").unwrap(), ModelSource::Local(_)));
    }

    #[test]
    fn offline_and_not_cached_names_repo_file_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HOME", dir.path());
        let e = resolve_file("someone/not-cached", "main", "unet/config.json", true).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("someone/not-cached") && msg.contains("unet/config.json"), "{msg}");
        assert!(msg.contains("Fix:"), "{msg}");
    }

    #[test]
    fn local_folder_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve_sd(&ModelSource::Local(dir.path().into()), true).unwrap_err();
        assert!(e.to_string().contains("unet/config.json"), "{e}");
    }
}
