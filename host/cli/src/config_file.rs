//! `--config FILE`: the settings of `div serve` and `div custodian` from a TOML file.
//!
//! Every flag of the command can be set in the file under its long name (`listen = "…"`,
//! `max_concurrency = 64` or `max-concurrency = 64`, `no_batching = true`, lists as arrays), so the
//! file and `--help` never disagree: the file is turned into the flags it stands for before clap
//! parses the command line, and clap checks them like any others. Precedence, highest first: a
//! flag on the command line, the flag's environment variable, the file, the default. A key that
//! names no flag is an error naming the key and the file, not a silent no-op.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, bail};
use clap::ArgAction;

/// The subcommands that take `--config`.
const WITH_CONFIG: &[&str] = &["serve", "custodian"];

/// `args` (a whole command line, program name first) with the settings of its `--config` file
/// put in as flags right after the subcommand. A command line without `--config` is returned as
/// it is.
pub fn expand(command: &clap::Command, args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    // `div` has no flags of its own: the subcommand is always the first argument
    let sub_at = 1;
    if !args.get(sub_at).is_some_and(|a| WITH_CONFIG.iter().any(|s| a == s)) {
        return Ok(args);
    }
    let Some(file) = config_path(&args[sub_at + 1..]) else { return Ok(args) };
    let name = args[sub_at].to_string_lossy().into_owned();
    let sub = command.find_subcommand(&name).with_context(|| format!("no subcommand {name}"))?;
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let flags = flags_from(sub, &text, &args[sub_at + 1..], &|var| std::env::var_os(var).is_some())
        .with_context(|| format!("in {}", file.display()))?;
    let mut out = args[..=sub_at].to_vec();
    out.extend(flags);
    out.extend_from_slice(&args[sub_at + 1..]);
    Ok(out)
}

/// The value of `--config` among a subcommand's arguments.
fn config_path(args: &[OsString]) -> Option<std::path::PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(|p| Path::new(p).to_path_buf());
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.into());
        }
    }
    None
}

/// The flags `text` (TOML) stands for, leaving out those given on the command line (`given`) or
/// by their environment variable (`env_set`).
fn flags_from(
    sub: &clap::Command,
    text: &str,
    given: &[OsString],
    env_set: &dyn Fn(&std::ffi::OsStr) -> bool,
) -> anyhow::Result<Vec<OsString>> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let on_command_line = |long: &str| {
        given.iter().any(|a| {
            let a = a.to_string_lossy();
            a == format!("--{long}") || a.starts_with(&format!("--{long}="))
        })
    };
    let mut flags = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = sub.get_arguments().find(|a| a.get_long() == Some(long.as_str())) else {
            bail!(
                "unknown setting `{key}`: `div {} --help` lists every flag, each a setting",
                sub.get_name()
            );
        };
        if long == "config" {
            bail!("`config` cannot be set in a config file");
        }
        if on_command_line(&long) || arg.get_env().is_some_and(env_set) {
            continue;
        }
        let switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        match value {
            toml::Value::Boolean(b) if switch => {
                if *b {
                    flags.push(format!("--{long}").into());
                }
            }
            _ if switch => bail!("`{key}` is a switch: set it to true or false"),
            toml::Value::Array(items) => {
                let items = items.iter().map(|v| scalar(key, v)).collect::<anyhow::Result<Vec<_>>>()?;
                if matches!(arg.get_action(), ArgAction::Append) {
                    for item in items {
                        flags.push(format!("--{long}").into());
                        flags.push(item.into());
                    }
                } else {
                    flags.push(format!("--{long}={}", items.join(",")).into());
                }
            }
            other => flags.push(format!("--{long}={}", scalar(key, other)?).into()),
        }
    }
    Ok(flags)
}

fn scalar(key: &str, v: &toml::Value) -> anyhow::Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        _ => bail!("`{key}` must be a string, a number, a boolean or a list of them"),
    })
}

#[cfg(test)]
mod tests {
    use clap::{Arg, Command};

    use super::*;

    fn command() -> Command {
        Command::new("div").subcommand(
            Command::new("serve")
                .arg(Arg::new("config").long("config"))
                .arg(Arg::new("listen").long("listen").env("T_LISTEN"))
                .arg(Arg::new("max-concurrency").long("max-concurrency"))
                .arg(Arg::new("no-batching").long("no-batching").action(ArgAction::SetTrue))
                .arg(Arg::new("custodian").long("custodian").value_delimiter(','))
                .arg(Arg::new("allow-owner").long("allow-owner").action(ArgAction::Append)),
        )
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn flags(text: &str, given: &[&str], env: &[&str]) -> anyhow::Result<Vec<String>> {
        let c = command();
        let sub = c.find_subcommand("serve").context("serve")?;
        let env: Vec<String> = env.iter().map(|s| s.to_string()).collect();
        let set = move |v: &std::ffi::OsStr| env.iter().any(|e| v == e.as_str());
        Ok(flags_from(sub, text, &os(given), &set)?
            .iter()
            .map(|f| f.to_string_lossy().into_owned())
            .collect())
    }

    #[test]
    fn every_kind_of_setting_becomes_its_flag() -> anyhow::Result<()> {
        let f = flags(
            "listen = \"0.0.0.0:80\"\nmax_concurrency = 64\nno-batching = true\n\
             custodian = [\"http://a\", \"http://b\"]\nallow_owner = [\"0x1\", \"0x2\"]\n",
            &[],
            &[],
        )?;
        assert!(f.contains(&"--listen=0.0.0.0:80".to_string()), "{f:?}");
        assert!(f.contains(&"--max-concurrency=64".to_string()));
        assert!(f.contains(&"--no-batching".to_string()));
        assert!(f.contains(&"--custodian=http://a,http://b".to_string()));
        let owners: Vec<_> = f.windows(2).filter(|w| w[0] == "--allow-owner").map(|w| w[1].clone()).collect();
        assert_eq!(owners, ["0x1", "0x2"]);
        assert!(flags("no_batching = false", &[], &[])?.is_empty(), "a false switch is left off");
        Ok(())
    }

    #[test]
    fn the_command_line_and_the_environment_win_over_the_file() -> anyhow::Result<()> {
        let text = "listen = \"0.0.0.0:80\"\nmax_concurrency = 64";
        assert_eq!(flags(text, &["--listen", "127.0.0.1:1"], &[])?, ["--max-concurrency=64"]);
        assert_eq!(flags(text, &["--max-concurrency=8"], &[])?, ["--listen=0.0.0.0:80"]);
        assert_eq!(flags(text, &[], &["T_LISTEN"])?, ["--max-concurrency=64"]);
        Ok(())
    }

    #[test]
    fn a_key_that_names_no_flag_or_a_wrong_shape_is_an_error() {
        let e = |t: &str| flags(t, &[], &[]).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e("listn = \"x\"").contains("unknown setting `listn`"));
        assert!(e("no_batching = \"yes\"").contains("is a switch"));
        assert!(e("listen = { a = 1 }").contains("must be a string"));
        assert!(e("config = \"other.toml\"").contains("cannot be set in a config file"));
        assert!(e("listen = ").contains("not valid TOML"));
    }

    /// The config files the release ships parse as the real commands take them: every key a
    /// flag, every value one its flag accepts.
    #[test]
    fn the_shipped_config_files_parse_as_the_real_commands() -> anyhow::Result<()> {
        use clap::{CommandFactory, Parser};
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
        for (sub, file) in [("serve", "div.toml"), ("custodian", "custodian.toml")] {
            let path = deploy.join(file);
            let args =
                expand(&crate::Cli::command(), os(&["div", sub, "--config", &path.to_string_lossy()]))?;
            assert!(args.len() > 4, "{file} set nothing");
            crate::Cli::try_parse_from(args).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        }
        Ok(())
    }

    #[test]
    fn the_file_goes_in_right_after_the_subcommand() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("div-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("div.toml");
        std::fs::write(&file, "max_concurrency = 64\n")?;
        let args = os(&["div", "serve", "--config", &file.to_string_lossy(), "--listen", "x"]);
        let out = expand(&command(), args)?;
        let out: Vec<String> = out.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(out[..3], ["div", "serve", "--max-concurrency=64"]);
        assert_eq!(out[3..], ["--config", &file.to_string_lossy(), "--listen", "x"]);
        // no --config: untouched
        assert_eq!(expand(&command(), os(&["div", "serve"]))?, os(&["div", "serve"]));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
