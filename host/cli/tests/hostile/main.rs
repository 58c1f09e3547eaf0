//! Hostile runs against real processes: every attack of the trust-boundary review and every
//! fault of the reliability review, one named trial each, performed the way the attacker or the
//! fault would (a stranger's wallet, an owner's look-alike model, a plugin that lies or floods, a
//! client that stalls, a chain RPC that refuses or goes silent, custodians that are down, a host
//! killed mid-flight).
//!
//! Most attacks share one stack (anvil with the contracts, three custodians, a metering host
//! serving a set of hostile and honest models) started once; faults that break the chain or the
//! host bring their own. Trials run one at a time: some measure latency, some stop an RPC.
//! The runner is `libtest-mimic`, so the output and the summary read like any `cargo test`.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;

use libtest_mimic::{Arguments, Failed, Trial};

#[path = "../rig/mod.rs"]
mod rig;

mod attacks;
mod faults;
mod proxy;
mod stack;

fn div() -> Command {
    Command::new(env!("CARGO_BIN_EXE_div"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("div-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

type Run = fn(Arc<stack::Shared>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

fn trial(rt: &tokio::runtime::Handle, shared: &Arc<stack::Shared>, name: &'static str, run: Run) -> Trial {
    let (rt, shared) = (rt.clone(), shared.clone());
    Trial::test(name, move || rt.block_on(run(shared)).map_err(|e| Failed::from(format!("{e:?}"))))
}

macro_rules! trials {
    ($rt:expr, $shared:expr, $($module:ident :: $name:ident),* $(,)?) => {
        vec![$(trial($rt, $shared, concat!(stringify!($module), "::", stringify!($name)), |s| Box::pin($module::$name(s)))),*]
    };
}

fn main() -> std::process::ExitCode {
    let mut args = Arguments::from_args();
    // one at a time: trials measure latency, stop RPCs and kill hosts
    args.test_threads = Some(1);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hostile: no runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shared = Arc::new(stack::Shared::default());
    let h = rt.handle().clone();
    let trials = trials!(
        &h,
        &shared,
        attacks::a_lookalike_model_cannot_take_over_a_name,
        attacks::a_permit_read_from_the_chain_buys_nothing,
        attacks::signatures_the_contract_refuses_get_no_key,
        attacks::a_smart_account_signs_permits_and_proofs,
        attacks::a_spinning_model_leaves_others_their_fair_share,
        attacks::plugin_output_cannot_swell_the_host,
        attacks::host_imports_cannot_outlive_the_deadline,
        attacks::oversized_or_invalid_input_is_refused_before_any_work,
        attacks::sign_in_for_another_domain_is_refused,
        attacks::strangers_cannot_grow_the_hosts_state,
        attacks::slow_clients_cannot_hold_the_host,
        attacks::billing_counts_what_the_backend_generated_not_what_the_plugin_claims,
        attacks::keys_and_state_are_not_visible_to_other_users,
        attacks::a_user_message_cannot_forge_a_turn_through_the_api,
        attacks::receipts_sign_the_hosts_own_request_id,
        faults::a_resent_settlement_moves_nothing_and_sends_nothing,
        faults::a_permit_the_contract_refuses_is_marked_and_never_resent,
        faults::settlement_heals_after_the_rpc_refuses_then_hangs,
        faults::a_silent_rpc_stalls_no_paid_traffic,
        faults::a_model_that_failed_to_load_heals_by_itself,
        faults::failures_name_their_real_cause,
    );
    let conclusion = libtest_mimic::run(&args, trials);
    // the shared stack's processes end with it
    rt.block_on(shared.stop());
    drop(rt);
    conclusion.exit_code()
}
