//! `.div/demo.env`: the `KEY=value` file `make demo` leaves behind so scripts, clients and tests
//! find what it started. Each command that starts something merges its keys in; keys it does not
//! name are kept.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use div_chain::Deployment;

/// Merges `pairs` into the env file at `path` (created with its folder if missing).
pub fn merge(path: &Path, pairs: &[(&str, String)]) -> anyhow::Result<()> {
    let mut map = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=')
                && !k.trim_start().starts_with('#')
            {
                map.insert(k.trim().to_string(), v.to_string());
            }
        }
    }
    for (k, v) in pairs {
        map.insert((*k).to_string(), v.clone());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut out = String::from("# written by div; source it: set -a; . .div/demo.env; set +a\n");
    for (k, v) in map {
        out.push_str(&format!("{k}={v}\n"));
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// The keys that describe a deployment.
pub fn deployment_pairs(d: &Deployment) -> Vec<(&'static str, String)> {
    let mut pairs = vec![
        ("DIV_RPC_URL", d.rpc_url.clone()),
        ("DIV_CHAIN_ID", d.chain_id.to_string()),
        ("DIV_MODEL_VAULT", d.model_vault.to_string()),
        ("DIV_PAYMENT_STREAM", d.payment_stream.to_string()),
        ("DIV_ACCESS_TOKEN_IMPL", d.access_token_implementation.to_string()),
        ("DIV_GOVERNANCE", d.governance.to_string()),
    ];
    for c in &d.stablecoins {
        let key = match c.symbol.to_ascii_uppercase().as_str() {
            "USDC" => "DIV_USDC",
            "USDFC" => "DIV_USDFC",
            _ => continue,
        };
        pairs.push((key, c.address.to_string()));
    }
    pairs
}

/// Prints the addresses as a person reads them.
pub fn print_deployment(d: &Deployment) {
    println!("DIV contracts on chain {} ({})", d.chain_id, d.rpc_url);
    println!("  ModelVault          {}", d.model_vault);
    println!("  PaymentStream       {}", d.payment_stream);
    println!("  ModelAccessToken    {} (implementation for per-model tokens)", d.access_token_implementation);
    for c in &d.stablecoins {
        let tag = if c.dev { " (local stand-in)" } else { "" };
        println!("  {:<19} {} ({} decimals){tag}", c.symbol, c.address, c.decimals);
    }
    println!("  governance          {}", d.governance);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_keeps_other_keys_and_replaces_named_ones() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("div-env-{}", std::process::id()));
        let path = dir.join("demo.env");
        merge(&path, &[("DIV_URL", "http://a".into()), ("DIV_RPC_URL", "http://old".into())])?;
        merge(&path, &[("DIV_RPC_URL", "http://new".into())])?;
        let text = std::fs::read_to_string(&path)?;
        assert!(text.contains("DIV_URL=http://a\n"), "{text}");
        assert!(text.contains("DIV_RPC_URL=http://new\n"), "{text}");
        assert!(!text.contains("http://old"), "{text}");
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }
}
