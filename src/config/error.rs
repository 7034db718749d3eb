//! The error of a setting that parsed but makes no sense, alone or with the others.

/// A setting that parsed but makes no sense on its own terms or with the others.
#[derive(Debug, thiserror::Error)]
pub enum SettingError {
    #[error("invalid {variable}={value:?}: {reason}")]
    Invalid {
        variable: &'static str,
        value: String,
        reason: String,
    },
    /// One or two of the three join settings: the operator meant to join and forgot one.
    #[error(
        "{set} set but {missing} not: joining the mesh needs CONTROLLER_URL, JOIN_TOKEN \
         and NODE_ID together; unset {set_names} to run standalone"
    )]
    IncompleteJoin {
        set: String,
        missing: String,
        set_names: String,
    },
}

pub(super) fn invalid(
    variable: &'static str,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> SettingError {
    SettingError::Invalid {
        variable,
        value: value.into(),
        reason: reason.into(),
    }
}

/// `A`, `A and B`, `A, B and C`, with the verb that agrees with the count.
pub(super) fn names_with_verb(names: &[&str]) -> String {
    let list = match names {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    };
    format!("{list} {}", if names.len() == 1 { "is" } else { "are" })
}
