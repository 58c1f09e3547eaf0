//! `div cid FILE`: the content id `ipfs add` would give a file (CIDv1, and CIDv0 with `--v0`).

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `div cid`.
#[derive(clap::Args)]
pub struct CidArgs {
    /// The file.
    file: PathBuf,
    /// Print the CIDv0 (`Qm…`) form instead.
    #[arg(long)]
    v0: bool,
}

/// Runs `div cid`.
pub fn run(args: CidArgs) -> anyhow::Result<()> {
    let file = std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    let id = div_vault::cid::compute(std::io::BufReader::with_capacity(1 << 20, file))
        .with_context(|| format!("reading {}", args.file.display()))?;
    println!("{}", if args.v0 { id.v0() } else { id.v1() });
    Ok(())
}
