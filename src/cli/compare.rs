//! `loren compare`: the methods side by side on the same backbone, data, seed and budget.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use loren::backbone;
use loren::report::{comparison_table, growth_per_member};
use loren::run::run;
use loren_nn::checkpoint::write_atomic;
use loren_nn::config::{Method, VitConfig};

use super::args::{
    Common, DataArgs, EnsembleArgs, ModelArgs, OptimArgs, run_spec, splits, write_outputs,
};

#[derive(Args, Clone)]
pub struct CompareArgs {
    #[command(flatten)]
    pub common: Common,
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
    /// Ensemble sizes to run explicit and lora at, in place of --members (e.g. 1,4,16): one row
    /// per size, then what each method adds per member, to see how parameters and memory grow
    /// with M.
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Output folder.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
}

pub fn compare(a: &CompareArgs) -> Result<()> {
    let methods = a
        .methods
        .iter()
        .map(|m| m.parse::<Method>().map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let mut vit = VitConfig::by_name(&a.model.config)?;
    let data = splits(&a.data, &vit)?;
    let backbone = backbone::resolve(
        a.model.backbone.as_deref(),
        &mut vit,
        &data,
        a.common.verbosity(),
    )?;
    let sizes = if a.sizes.is_empty() {
        vec![a.ensemble.members]
    } else {
        a.sizes.clone()
    };
    let mut results = Vec::new();
    for method in methods {
        let members: &[usize] = if method.is_single() { &[1] } else { &sizes };
        for &m in members {
            let ensemble = EnsembleArgs {
                members: m,
                ..a.ensemble.clone()
            };
            let mut spec = run_spec(
                &a.common,
                &a.model,
                &ensemble,
                &a.optim,
                &a.data,
                method,
                data.train.classes,
                None,
            )?;
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
    }
    print!("{}", comparison_table(&results));
    print!("{}", growth_per_member(&results));
    let json = a.out.join("compare.json");
    write_atomic(&json, serde_json::to_string_pretty(&results)?.as_bytes())?;
    println!(
        "wrote {} and a report.json and reliability.svg per method under {}",
        json.display(),
        a.out.display()
    );
    Ok(())
}
