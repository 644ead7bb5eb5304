//! The one rule for names that cross a trust boundary: container ids and exec ids, given by an
//! operator to the agent and by the agent to the shim. Both sides check them with this function,
//! so a name that one side accepts the other accepts too, and no accepted name can be a path
//! (no `/`, never `.` or `..`, no NUL): the agent and the shim use names as file and directory
//! names.

/// The longest id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Why an id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {what} {shown:?}: use 1-{MAX_ID_LEN} characters from [A-Za-z0-9_.-], starting with a letter or digit"
)]
pub struct IdError {
    /// Which kind of id.
    pub what: &'static str,
    /// The refused value, cut to a readable length.
    pub shown: String,
}

/// Checks a container or exec id against Docker's rule for names, `[a-zA-Z0-9][a-zA-Z0-9_.-]*`,
/// at most [`MAX_ID_LEN`] bytes.
pub fn validate_id(what: &'static str, value: &str) -> Result<(), IdError> {
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if first_ok && rest_ok && value.len() <= MAX_ID_LEN {
        return Ok(());
    }
    Err(IdError {
        what,
        shown: value.chars().take(2 * MAX_ID_LEN).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_names_pass_and_paths_do_not() {
        for good in ["a", "web-1", "A.b_c-9", "0", &"x".repeat(MAX_ID_LEN)] {
            assert_eq!(validate_id("container id", good), Ok(()), "{good:?}");
        }
        let long = "x".repeat(MAX_ID_LEN + 1);
        for bad in [
            "", "/", ".", "..", "../x", "a/b", "-a", ".hidden", "_a", "a b", "a\0b", "é", &long,
        ] {
            let err = validate_id("container id", bad).unwrap_err();
            assert!(err.to_string().starts_with("invalid container id"), "{err}");
        }
    }
}
