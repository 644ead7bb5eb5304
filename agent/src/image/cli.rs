//! `gantry-agent image convert-layer`: converts one layer file into an EROFS image.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use anyhow::Context;

use super::layer::{ConvertOptions, convert_layer};

/// Arguments of `image convert-layer`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertLayerArgs {
    /// Layer to convert: tar, tar+gzip or tar+zstd (detected by magic bytes); `-` for stdin.
    #[arg(long, short)]
    pub input: String,
    /// Where to write the EROFS image (replaced atomically when complete).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Refuse layers whose uncompressed tar exceeds this size (suffixes K, M, G, T: powers of
    /// 1024).
    #[arg(long, default_value = "64G", value_parser = parse_size)]
    pub max_uncompressed_size: u64,
    /// Refuse layers with more entries than this.
    #[arg(long, default_value_t = ConvertOptions::default().max_entries)]
    pub max_entries: u64,
    /// Store all-zero blocks as data instead of holes.
    #[arg(long)]
    pub no_holes: bool,
    /// fsync the image before renaming it into place.
    #[arg(long)]
    pub sync: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses a byte count with an optional binary suffix (`512`, `64K`, `2G`, `1T`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix {c:?}")),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Runs `image convert-layer`: prints the image digest and size on success.
pub fn run_convert_layer(args: &ConvertLayerArgs) -> anyhow::Result<()> {
    let options = ConvertOptions {
        max_uncompressed_size: args.max_uncompressed_size,
        max_entries: args.max_entries,
        detect_holes: !args.no_holes,
        sync: args.sync,
        ..ConvertOptions::default()
    };
    let input: Box<dyn Read> = if args.input == "-" {
        Box::new(io::stdin().lock())
    } else {
        Box::new(File::open(&args.input).with_context(|| format!("opening layer {}", args.input))?)
    };
    let summary = convert_layer(input, &args.output, &options)
        .with_context(|| format!("converting {} into {}", args.input, args.output.display()))?;
    let mut stdout = io::stdout().lock();
    if args.json {
        let json = serde_json::json!({
            "digest": summary.oci_digest(),
            "size": summary.size,
            "entries": summary.entries,
            "inodes": summary.inodes,
            "compression": summary.compression.to_string(),
            "uncompressed_size": summary.uncompressed_size,
        });
        writeln!(stdout, "{json}")?;
    } else {
        writeln!(stdout, "digest: {}", summary.oci_digest())?;
        writeln!(stdout, "size: {}", summary.size)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
