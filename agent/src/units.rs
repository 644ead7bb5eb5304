//! Byte counts as people write them (`20G`, `512k`): the CLI's flags and the cluster manifest's
//! budgets parse them the same way.

/// A size that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("size {text:?} {reason}")]
pub struct SizeError {
    text: String,
    reason: &'static str,
}

/// Parses a byte count with an optional binary suffix, as Docker does: `4096`, `512k`, `512kb`,
/// `256M`, `2g`, `1T`. Zero is a size (budgets use it for "no limit").
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let fail = |reason| SizeError {
        text: text.to_owned(),
        reason,
    };
    let lower = text.trim().to_ascii_lowercase();
    let lower = lower.strip_suffix('b').unwrap_or(&lower);
    let (digits, shift) = match lower.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(fail("has an unknown suffix (use k, m, g or t)")),
            };
            (&lower[..i], shift)
        }
        _ => (lower, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| fail("is not a number with an optional k, m, g or t suffix"))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| fail("is too large"))
}

/// A size that must be more than zero (`--memory`, `--writable-layer`).
pub fn parse_limit(text: &str) -> Result<u64, SizeError> {
    match parse_size(text)? {
        0 => Err(SizeError {
            text: text.to_owned(),
            reason: "must be more than zero",
        }),
        size => Ok(size),
    }
}
