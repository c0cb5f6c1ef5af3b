//! `bitferry manifest create`: write the per-block BLAKE3 manifest of a backup image.

use super::Ctx;
use super::output::print;
use super::units::parse_size;
use crate::rebuild::manifest;
use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Manifest commands.
#[derive(Debug, Subcommand)]
pub enum ManifestCmd {
    /// Hash every block of a backup image (BLAKE3 per block, the last one may be partial) into a
    /// manifest, so a later `rebuild --manifest` needs to read only the live disk. Written
    /// atomically; holes are hashed as zeros without being read.
    Create(CreateArgs),
}

/// `manifest create` arguments.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The backup image (raw file or block device).
    #[arg(long)]
    pub image: PathBuf,
    /// Block size: a power of two from 512 to 64M; must equal the rebuild's granularity.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub granularity: u64,
    /// Where to write the manifest.
    #[arg(long)]
    pub out: PathBuf,
}

/// Run a manifest command.
pub fn run(ctx: &Ctx, cmd: ManifestCmd) -> Result<()> {
    match cmd {
        ManifestCmd::Create(a) => {
            let t = Instant::now();
            let c = manifest::create(&a.image, a.granularity, &a.out)?;
            print(
                ctx.json,
                &json!({
                    "image": a.image,
                    "size": c.size,
                    "granularity": a.granularity,
                    "blocks": c.blocks,
                    "root": hex(&c.root),
                    "seconds": t.elapsed().as_secs_f64(),
                }),
            );
            Ok(())
        }
    }
}

/// Lowercase hex of a hash.
pub fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}
