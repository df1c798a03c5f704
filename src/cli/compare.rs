//! `loren compare`: the methods side by side on the same backbone, data, seed and budget.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::say;
use loren::backbone;
use loren::bench::budget_for;
use loren::report::{comparison_table, growth_per_member};
use loren::run::{RunSpec, check_fits_within, run};
use loren_nn::checkpoint::write_atomic;
use loren_nn::config::{Method, VitConfig};
use loren_nn::data::Splits;

use super::args::{
    Common, DataArgs, EnsembleArgs, ModelArgs, OptimArgs, SeedArgs, run_spec, splits, write_outputs,
};

// The shared --method is train's: compare runs every one of --methods, so it is hidden here, and
// an empty default tells a given one (even `--method lora`) from none.
#[derive(Args, Clone)]
#[command(mut_arg("method", |a| a.hide(true).default_value("")))]
pub struct CompareArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub seed: SeedArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub ensemble: EnsembleArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Methods to compare, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "single,single-lora,explicit,lora"
    )]
    pub methods: Vec<String>,
    /// Ensemble sizes to run explicit and lora at, in place of -m/--members (not with it; e.g.
    /// 1,4,16): one row per size, then what each method adds per member, to see how parameters
    /// and memory grow with M.
    #[arg(long, value_delimiter = ',', conflicts_with = "members")]
    pub sizes: Vec<usize>,
    /// Output folder.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
}

/// One run of the comparison: a method at an ensemble size, settled before any trains.
struct Planned {
    method: Method,
    members: usize,
    spec: RunSpec,
}

pub fn compare(a: &CompareArgs) -> Result<()> {
    // Everything that can be refused is, before the data is read and the first method trains.
    if !a.ensemble.method.is_empty() {
        bail!(
            "--method {}: compare takes --methods (e.g. --methods {0})",
            a.ensemble.method
        );
    }
    let methods = a
        .methods
        .iter()
        .map(|m| m.parse::<Method>().map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    if let Some(twice) = methods
        .iter()
        .find(|m| methods.iter().filter(|n| n == m).count() > 1)
    {
        bail!(
            "--methods names {} twice: each method is one run, into its own folder",
            twice.name()
        );
    }
    a.optim.check()?;
    a.ensemble.check()?;
    a.data.check()?;
    loren::outputs::writable_dir(&a.out, "--out")?;
    let mut vit = VitConfig::by_name(&a.model.config)?;
    let data = splits(&a.data, &vit)?;
    let plan = plan(a, &methods, &data)?;
    check_all_fit(&plan, &data)?;
    let backbone = backbone::resolve(
        a.model.backbone.as_deref(),
        &mut vit,
        &data,
        a.common.verbosity(),
    )?;
    let mut results = Vec::new();
    for Planned {
        method,
        members: m,
        mut spec,
    } in plan
    {
        spec.vit = vit.clone();
        let r = run(&spec, &data, &backbone)
            .with_context(|| format!("method {method} with {m} members"))?;
        let dir = match a.sizes.len() > 1 && !method.is_single() {
            true => a.out.join(format!("{}-M{m}", method.name())),
            false => a.out.join(method.name()),
        };
        write_outputs(&dir, &r, &data.test.name)?;
        results.push(r);
    }
    // Written before the table is printed: a reader that stops early (| head) loses nothing.
    let json = a.out.join("compare.json");
    write_atomic(&json, serde_json::to_string_pretty(&results)?.as_bytes())?;
    say(format_args!("{}", comparison_table(&results)))?;
    say(format_args!("{}", growth_per_member(&results)))?;
    say(format_args!(
        "wrote {} and a report.json and reliability.svg per method under {}\n",
        json.display(),
        a.out.display()
    ))?;
    Ok(())
}

/// Every run, in order, each one's settings validated.
fn plan(a: &CompareArgs, methods: &[Method], data: &Splits) -> Result<Vec<Planned>> {
    let sizes = if a.sizes.is_empty() {
        vec![a.ensemble.members()]
    } else {
        a.sizes.clone()
    };
    let mut plan = Vec::new();
    for &method in methods {
        let members: &[usize] = if method.is_single() { &[1] } else { &sizes };
        for &m in members {
            let ensemble = EnsembleArgs {
                members: Some(m),
                ..a.ensemble.clone()
            };
            let spec = run_spec(
                &a.common,
                a.seed.seed,
                &a.model,
                &ensemble,
                &a.optim,
                &a.data,
                method,
                data.train.classes,
                None,
            )?;
            plan.push(Planned {
                method,
                members: m,
                spec,
            });
        }
    }
    Ok(plan)
}

/// The memory check each run makes as it starts, made for all of them first: a size too large
/// fails now, not after the runs before it have trained.
fn check_all_fit(plan: &[Planned], data: &Splits) -> Result<()> {
    let Some(first) = plan.first() else {
        return Ok(());
    };
    let device = first.spec.device.open()?;
    let Some(budget) = budget_for(&device, None) else {
        return Ok(());
    };
    plan.iter()
        .try_for_each(|p| check_fits_within(&p.spec, data, &device, &budget))
}
