//! Parsing the text of diffusers `config.json` / `scheduler_config.json` files into the serde config
//! types of this module tree, with errors that name the file, the key and what is supported. The
//! caller reads the file (this module tree does no I/O) and passes its path as `origin`.

use serde::de::DeserializeOwned;

/// Why a model or scheduler config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin} is not a valid config: {source}")]
    Parse {
        origin: String,
        source: serde_json::Error,
    },
    #[error("{origin}: `{key}` = {value} is not supported (supported: {supported})")]
    Unsupported {
        origin: String,
        key: String,
        value: String,
        supported: String,
    },
}

impl ConfigError {
    /// Shorthand for [`ConfigError::Unsupported`]; `value` is printed as given (quote strings).
    pub fn unsupported(
        origin: &str,
        key: impl Into<String>,
        value: impl Into<String>,
        supported: impl Into<String>,
    ) -> Self {
        ConfigError::Unsupported {
            origin: origin.to_string(),
            key: key.into(),
            value: value.into(),
            supported: supported.into(),
        }
    }

    /// The same error attributed to `origin` (a file path) instead of the generic origin.
    pub fn with_origin(self, new_origin: &str) -> Self {
        match self {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                origin: new_origin.to_string(),
                source,
            },
            ConfigError::Unsupported {
                key,
                value,
                supported,
                ..
            } => ConfigError::Unsupported {
                origin: new_origin.to_string(),
                key,
                value,
                supported,
            },
        }
    }
}

/// Parse JSON text; `origin` names where it came from in error messages.
pub fn parse_json<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    serde_json::from_str(text).map_err(|source| ConfigError::Parse {
        origin: origin.to_string(),
        source,
    })
}
