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
    /// atomically; holes are hashed as zeros without being read. The manifest records which
    /// file it was made from (path, size, device, inode, mtime), and `rebuild` refuses it for
    /// that very file.
    #[command(after_help = "EXAMPLES:\n  \
        bitferry manifest create --image /backup/vm42-vda.raw --granularity 64K --out /backup/vm42-vda.manifest\n  \
        bitferry manifest create --image /backup/vm42-vda.raw --out /backup/vm42-vda.manifest --force   # replace it")]
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
    /// Where to write the manifest. An existing file is refused unless --force is given.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the --out file if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Run a manifest command.
pub fn run(ctx: &Ctx, cmd: ManifestCmd) -> Result<()> {
    match cmd {
        ManifestCmd::Create(a) => {
            let t = Instant::now();
            let c = manifest::create_to(&a.image, a.granularity, &a.out, a.force)?;
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
