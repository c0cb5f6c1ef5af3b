//! `bitferry demo`: a narrated tour that runs the real binary on this machine, in a temporary
//! directory, printing each command and what it shows.

use super::Ctx;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::Path;
use std::process::Command;

/// `demo` arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's temporary directory and print its path.
    #[arg(long)]
    pub keep: bool,
}

struct Narrator<'a> {
    exe: std::path::PathBuf,
    store: &'a Path,
}

impl Narrator<'_> {
    fn say(&self, text: &str) {
        println!("\n== {text}");
    }

    /// Run `bitferry ARGS`, echo it and its output; return (exit code, stdout).
    fn run(&self, args: &[&str]) -> Result<(i32, String)> {
        println!("$ bitferry {}", args.join(" "));
        let out = Command::new(&self.exe)
            .arg("--store")
            .arg(self.store)
            .args(args)
            .output()
            .context("running bitferry")?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        for line in stdout
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            println!("  {line}");
        }
        Ok((out.status.code().unwrap_or(-1), stdout))
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let (code, out) = self.run(args)?;
        if code != 0 {
            bail!(
                "demo step failed: bitferry {} exited {code}",
                args.join(" ")
            );
        }
        Ok(out)
    }
}

/// Run the demo.
pub fn run(_ctx: &Ctx, a: DemoArgs) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("bitferry-demo-")
        .tempdir()?;
    let store = dir.path().join("store");
    let n = Narrator {
        exe: std::env::current_exe()?,
        store: &store,
    };
    println!("bitferry demo: the bitmap store, its root hash, and what happens to a corrupt file.");
    println!("(working in {})", dir.path().display());

    n.say("A 1 TiB disk tracked at 64 KiB granularity, counting from backup 'nightly-1'.");
    n.ok(&[
        "bitmap",
        "create",
        "--disk",
        "vm42/vda",
        "--size",
        "1T",
        "--granularity",
        "64K",
        "--checkpoint",
        "nightly-1",
    ])?;

    n.say("The guest writes three places; the manual tracker marks them (each commit is durable).");
    n.ok(&[
        "bitmap", "mark", "--disk", "vm42/vda", "--range", "0:4K", "--range", "1M:200K", "--range",
        "900G:1M",
    ])?;
    n.ok(&["bitmap", "show", "--disk", "vm42/vda"])?;

    n.say("Export the raw bitmap (QEMU's byte layout): its BLAKE3 is the root shown above.");
    let raw = dir.path().join("vda.raw");
    let raw_s = raw.to_string_lossy().to_string();
    let out = n.ok(&[
        "--json", "bitmap", "export", "--disk", "vm42/vda", "--raw", &raw_s,
    ])?;
    let reported: serde_json::Value = serde_json::from_str(&out)?;
    let bytes = std::fs::read(&raw)?;
    println!(
        "  blake3({}) = {}  (same as the root: {})",
        raw.display(),
        blake3::hash(&bytes).to_hex(),
        reported["root"].as_str() == Some(blake3::hash(&bytes).to_hex().as_str())
    );

    n.say("Verification passes on the intact store.");
    n.ok(&["bitmap", "verify", "--disk", "vm42/vda"])?;

    n.say("Now flip one byte in the stored file, as a bad disk or a torn write would.");
    let file = store.join(crate::store::file_name(&"vm42/vda".parse()?));
    let mut data = std::fs::read(&file)?;
    let at = data.len() - 1;
    data[at] ^= 0x40;
    std::fs::write(&file, &data)?;
    let (code, _) = n.run(&["bitmap", "verify", "--disk", "vm42/vda"])?;
    println!(
        "  -> exit code {code}: the bitmap is reported inconsistent, never handed out as consistent."
    );
    n.run(&["bitmap", "show", "--disk", "vm42/vda"])?;
    if code == 0 {
        bail!("verify accepted a corrupted store file");
    }

    println!(
        "\nDone. Migration between agents and rebuild arrive with their issues; see README.md."
    );
    if a.keep {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    Ok(())
}
