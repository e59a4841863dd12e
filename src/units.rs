//! Sizes as users write them (`2GB`, `500MiB`): a leaf shared by the config and `quantize`.
use anyhow::{anyhow, bail, ensure, Result};

/// Parses a shard size: bytes, or a number with KB/MB/GB (powers of 10, as transformers) or
/// KiB/MiB/GiB.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| anyhow!("size {text:?}: expected e.g. 2GB, 500MB or a byte count"))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        u => bail!("size {text:?}: unknown unit {u:?} (use B, KB, MB, GB, KiB, MiB or GiB)"),
    };
    let bytes = (num * mult).round();
    ensure!(bytes >= 1.0, "size {text:?} must be at least one byte");
    Ok(bytes as u64)
}
