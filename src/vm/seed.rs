//! The cloud-init NoCloud seed, built in memory (a small FAT image labelled CIDATA).
//! Interface stub: the implementation lands with branch `seed`.

/// What goes into one VM's seed.
#[derive(Debug, Clone)]
pub struct SeedSpec<'a> {
    /// meta-data `instance-id`: unique per VM (and per recreate).
    pub instance_id: &'a str,
    /// meta-data `local-hostname`, and the hostname in generated user-data.
    pub hostname: &'a str,
    /// Public keys for the image's default user (generated user-data only).
    pub ssh_authorized_keys: &'a [String],
    /// Raw user-data from the request, used verbatim instead of the generated one.
    pub user_data: Option<&'a str>,
    /// Raw network-config (NoCloud v1/v2 YAML), written verbatim when given.
    pub network_config: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The seed image could not be written.
    #[error("cannot build the cloud-init seed: {0}")]
    Build(String),
}

/// The seed image's bytes, ready to be uploaded as a raw volume.
pub fn build(_spec: &SeedSpec<'_>) -> Result<Vec<u8>, SeedError> {
    Err(SeedError::Build("not implemented yet".into()))
}

/// Checks one SSH public key line: a known key type, base64 body, one line, no control
/// characters. Returns the trimmed key.
pub fn validate_ssh_key(key: &str) -> Result<String, String> {
    Ok(key.trim().to_string())
}
