//! The names the agent gives libvirt objects (VMs, images, pools, networks): one rule,
//! `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}` (`api::doc::NAME_PATTERN` says the same to
//! clients). Safe as a libvirt object name and inside a volume name; never a path
//! component like `..`.

/// What is wrong with a name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a name must not be empty")]
    Empty,
    #[error("a name must start with a letter or digit")]
    Start,
    #[error("a name has at most 63 characters")]
    Long,
    #[error("character {0:?} is not allowed in a name (letters, digits, '_', '.', '-')")]
    Char(char),
}

/// Checks a VM, image, pool or network name; says what is wrong with it.
pub fn check_name(s: &str) -> Result<String, NameError> {
    let mut chars = s.chars();
    match chars.next() {
        None => return Err(NameError::Empty),
        Some(c) if !c.is_ascii_alphanumeric() => return Err(NameError::Start),
        Some(_) => {}
    }
    if s.len() > 63 {
        return Err(NameError::Long);
    }
    if let Some(c) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err(NameError::Char(c));
    }
    Ok(s.to_string())
}

checked_string!(
    /// A VM's name (the libvirt domain's, and the stem of its volumes' names).
    VmName,
    check_name,
    NameError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_one_rule() {
        for good in ["a", "web-1", "web_1.a", "0", &"x".repeat(63)] {
            assert_eq!(good.parse::<VmName>().unwrap(), *good);
        }
        for (bad, why) in [
            ("", "must not be empty"),
            ("../x", "must start with a letter or digit"),
            ("-a", "must start with a letter or digit"),
            ("a'b", "character '\\'' is not allowed"),
            ("a/b", "character '/' is not allowed"),
            ("é", "must start with a letter or digit"),
        ] {
            let err = bad.parse::<VmName>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert!(
            "x".repeat(64)
                .parse::<VmName>()
                .unwrap_err()
                .to_string()
                .contains("at most 63")
        );
    }

    #[test]
    fn json_and_sql_go_through_the_check() {
        let n: VmName = serde_json::from_str("\"web-1\"").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"web-1\"");
        let err = serde_json::from_str::<VmName>("\"../x\"").unwrap_err();
        assert!(err.to_string().contains("must start with"), "{err}");
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let back: VmName = c.query_row("SELECT ?1", [&n], |r| r.get(0)).unwrap();
        assert_eq!(back, n);
        let bad: rusqlite::Result<VmName> = c.query_row("SELECT '../x'", [], |r| r.get(0));
        assert!(bad.is_err());
    }
}
